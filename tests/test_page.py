"""The routing page in a real headless browser (Debian's chromium through selenium): type a prompt, press
Generate, watch the answer stream in with every token coloured by its dominant expert.

Under CI=true this must run (.ci/run installs chromium and chromium-driver); elsewhere it skips with a reason
when no browser is installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SCREENSHOT = os.environ.get("LORAMIX_PAGE_SCREENSHOT")  # where to keep the screenshot (e.g. for the README)


def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the browser test: install chromium and chromium-driver (.ci/run does)")
        pytest.skip("no chromium/chromedriver here (apt-get install -y chromium chromium-driver)")
    try:
        from selenium import webdriver
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("selenium is missing (a dev dependency: make test installs it)")
        pytest.skip("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.fixture(scope="module")
def page_server(tiny_server):
    return tiny_server


def test_the_page_streams_an_answer_with_tokens_coloured_by_expert(page_server, tiny_mixture, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser_or_skip()
    try:
        browser.get(page_server + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "experts:" in b.find_element(By.ID, "model").text)
        legend = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#legend span")]
        assert legend == tiny_mixture.expert_names

        prompt = "Question: What is 2 + 3?\n\nAnswer:"
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(prompt)
        tokens = browser.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys("24")
        browser.find_element(By.ID, "every_k").clear()
        browser.find_element(By.ID, "every_k").send_keys("1")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith(("done", "error")))
        status = browser.find_element(By.ID, "status").text
        assert status.startswith("done: 24 tokens"), status

        spans = browser.find_elements(By.CSS_SELECTOR, "#output span.tok")
        assert len(spans) == 24
        experts = {span.get_attribute("data-expert") for span in spans}
        assert experts <= set(tiny_mixture.expert_names) and experts - {None}
        assert all(span.value_of_css_property("background-color") not in ("", "rgba(0, 0, 0, 0)") for span in spans)
        expected = tiny_mixture.generate(prompt, every_k=1, max_new_tokens=24)
        shown = browser.execute_script("return document.getElementById('output').textContent")
        assert shown == expected.text
        hover = spans[0].get_attribute("data-weights")
        assert all(name in hover for name in tiny_mixture.expert_names)
        # the strip chart drew something
        drawn = browser.execute_script(
            "const c = document.getElementById('chart'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4)"
            " if (d[i]) n++; return n;"
        )
        assert drawn > 100
        shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        browser.quit()
