"""Screenshot of the routing page of a running `loramix serve` (headless chromium through selenium).

loramix serve --port 8000 &
python scripts/page_screenshot.py --url http://127.0.0.1:8000 --out docs/serve-page.png
"""

from __future__ import annotations

import argparse
import shutil

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

PROMPT = (
    "Context:\nThe Amazon river flows through Peru, Colombia and Brazil into the Atlantic Ocean.\n\n"
    "Question: Into which ocean does the Amazon flow? Explain in two sentences.\n\nAnswer:"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", default="docs/serve-page.png")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", default="48")
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1150,820"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        browser.get(args.url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: "experts:" in b.find_element(By.ID, "model").text)
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(args.prompt)
        tokens = browser.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys(args.max_tokens)
        browser.find_element(By.ID, "go").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith(("done", "error")))
        spans = browser.find_elements(By.CSS_SELECTOR, "#output span.tok")
        if len(spans) > 5:  # show the hover tooltip of one token
            webdriver.ActionChains(browser).move_to_element(spans[5]).perform()
        browser.save_screenshot(args.out)
        print(browser.find_element(By.ID, "status").text)
    finally:
        browser.quit()


if __name__ == "__main__":
    main()
