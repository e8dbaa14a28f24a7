"""Tiny, fast stand-ins for the real models: a byte-level tokenizer, a random Llama, random LoRA experts."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Question: What is 2 + 3?\n\nAnswer: 5",
    "Context:\nThe sky is blue.\n\nQuestion: What colour is the sky?\n\nAnswer: blue",
    "Write a function that adds two numbers.\n\nAnswer: def add(a, b): return a + b",
    "Question: Which gas do plants take in?\nChoices: A. oxygen\nB. carbon dioxide\n\nAnswer: B",
    "Answer: A Answer: B Answer: C Answer: D Answer: E",
] * 20


# A plain chat template, so the tiny model can serve /v1/chat/completions like a real instruct model.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_tiny_base(folder: Path, seed: int = 0, architecture: str = "llama") -> Path:
    """A randomly initialised 2-layer causal LM with its own small byte-level BPE tokenizer.

    architecture: "llama" (q_proj/k_proj/v_proj/o_proj) or "gpt_neox" (query_key_value/dense: other names)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from loramix.bench.synthetic import byte_level_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_tokenizer(CORPUS, 400, ["<pad>", "<eos>"], eos_token="<eos>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    torch.manual_seed(seed)
    if architecture == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=2048, rotary_pct=0.5, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        GPTNeoXForCausalLM(config).save_pretrained(folder)
        return folder
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


def make_random_expert(
    base_folder: Path,
    out: Path,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    metadata: dict | None = None,
    std: float = 0.3,
    use_rslora: bool = False,
) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved as a standard adapter folder."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=False,
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(out)
    if metadata is not None:
        (out / "loramix_expert.json").write_text(json.dumps(metadata))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, timeout: float = 120.0):
    """`loramix serve` in a child process on a free loopback port; returns (process, base url) once healthy."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    if "--dtype" not in args:  # the exactness reference, as the in-process models it is compared with
        args = (*args, "--dtype", "fp32")
    process = subprocess.Popen(
        [sys.executable, "-m", "loramix", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(process)
    output = process.stdout.read()[-3000:]
    raise RuntimeError(f"the server was not healthy within {timeout:.0f} s; its output:\n{output}")


def stop_server(process) -> None:
    """Stop the process we started, by its id: SIGTERM, then SIGKILL if it lingers."""
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def streamed(url: str, body: dict, on_chunk=None) -> dict:
    """A streamed completion: its text, whether it ended with [DONE], any error event, and its chunk count.
    `on_chunk(count)` is called after each token chunk (e.g. to act mid-stream)."""
    import json

    import httpx

    out = {"text": "", "done": False, "error": None, "chunks": 0, "status": None}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=300) as response:
        out["status"] = response.status_code
        for line in response.iter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]
                else:
                    out["chunks"] += 1
                    out["text"] += chunk["choices"][0]["text"]
                    if on_chunk is not None:
                        on_chunk(out["chunks"])
    return out
