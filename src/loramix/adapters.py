"""Reading LoRA experts: standard PEFT adapter folders (adapter_config.json + adapter_model.safetensors).

Each expert becomes plain tensors keyed by the module path inside the causal LM
("model.layers.0.self_attn.q_proj"), upcast to the compute dtype. Anything PEFT can save that the
mixture cannot represent exactly (DoRA, trained biases, extra saved modules, per-layer rank patterns)
is refused with a message instead of being silently approximated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loramix.errors import LoramixError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPERT_METADATA = "loramix_expert.json"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraPair:
    """One adapted Linear: delta(x) = scaling * B @ A @ x."""

    A: torch.Tensor  # [rank, in_features]
    B: torch.Tensor  # [out_features, rank]


@dataclass
class ExpertAdapter:
    name: str
    path: Path
    rank: int
    alpha: float
    scaling: float
    modules: dict[str, LoraPair]
    metadata: dict = field(default_factory=dict)  # loramix_expert.json, when the expert was trained here

    @property
    def task(self) -> str | None:
        return self.metadata.get("task")

    @property
    def base_model_signature(self) -> str | None:
        return self.metadata.get("base_model_signature")


def _read_config(path: Path, name: str) -> dict:
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise LoramixError(
            f"Expert '{name}': {config_file} is missing. An expert is a PEFT adapter folder holding "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (as written by `loramix train` or PeftModel.save_pretrained)."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoramixError(
            f"Expert '{name}': {config_file} is not valid JSON ({exc.msg}); re-save the adapter."
        ) from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise LoramixError(f"Expert '{name}' is a {config.get('peft_type')} adapter; only LoRA adapters can be mixed.")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
    }
    used = [key for key, present in unsupported.items() if present]
    if used:
        raise LoramixError(
            f"Expert '{name}' uses {', '.join(used)} in {config_file}; loramix mixes plain LoRA adapters "
            "(no DoRA, bias='none', no modules_to_save, one rank and alpha for all layers). Retrain without them."
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise LoramixError(f"Expert '{name}': {config_file} has no valid '{key}'.")
    return config


def _read_weights(path: Path, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        hint = (
            " (found adapter_model.bin: re-save it with safe_serialization=True)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise LoramixError(f"Expert '{name}': {weights_file} is missing{hint}.")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoramixError(
            f"Expert '{name}': {weights_file} is corrupt or truncated ({exc}); retrain or re-copy it."
        ) from exc
    return {key: tensor.to(dtype) for key, tensor in tensors.items()}


def _group_pairs(tensors: dict[str, torch.Tensor], rank: int, name: str) -> dict[str, LoraPair]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for half in ("lora_A", "lora_B"):
            marker = f".{half}."
            if marker in key:
                module = key.split(marker)[0]
                module = module[len(_PEFT_PREFIX) :] if module.startswith(_PEFT_PREFIX) else module
                halves.setdefault(module, {})[half] = tensor
                break
        else:
            raise LoramixError(f"Expert '{name}' holds a tensor '{key}' that is not a LoRA matrix; it cannot be mixed.")
    pairs = {}
    for module, parts in halves.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise LoramixError(
                f"Expert '{name}': module {module} has only {', '.join(parts)}; the adapter file is incomplete."
            )
        A, B = parts["lora_A"], parts["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != rank or B.shape[1] != rank:
            raise LoramixError(
                f"Expert '{name}': module {module} has A {tuple(A.shape)} and B {tuple(B.shape)}, "
                f"which do not match rank r={rank} in its adapter_config.json."
            )
        pairs[module] = LoraPair(A=A, B=B)
    if not pairs:
        raise LoramixError(f"Expert '{name}' holds no LoRA matrices.")
    return pairs


def adapter_folder(spec: str | Path) -> Path:
    """A local adapter folder as given, or a Hugging Face Hub id (owner/name) fetched into the HF cache (which
    also serves it offline once it is there)."""
    path = Path(spec).expanduser()
    text = str(spec)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_METADATA]))
    except Exception as exc:  # offline, no such repo, no access: huggingface_hub raises many kinds
        raise LoramixError(
            f"'{text}' is not a local folder, and fetching it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {exc}). Give the adapter's folder, or go online once to cache it."
        ) from exc


def load_expert(path: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32) -> ExpertAdapter:
    """Load one PEFT LoRA adapter folder (fp16/bf16 storage is upcast to `dtype`)."""
    path = Path(path)
    name = name or path.name
    if not path.is_dir():
        raise LoramixError(f"Expert '{name}': folder {path} does not exist.")
    config = _read_config(path, name)
    rank = int(config["r"])
    alpha = float(config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    metadata_file = path / EXPERT_METADATA
    metadata = json.loads(metadata_file.read_text(encoding="utf-8")) if metadata_file.is_file() else {}
    modules = _group_pairs(_read_weights(path, name, dtype), rank, name)
    return ExpertAdapter(
        name=name, path=path, rank=rank, alpha=alpha, scaling=scaling, modules=modules, metadata=metadata
    )


def check_same_base(experts: list[ExpertAdapter], signature: str, base_name: str) -> None:
    """Refuse experts whose recorded base model differs from this one."""
    for expert in experts:
        recorded = expert.base_model_signature
        if recorded is not None and recorded != signature:
            trained_on = expert.metadata.get("base_model", "another model")
            raise LoramixError(
                f"Expert '{expert.name}' was trained on base model '{trained_on}' (signature {recorded}), "
                f"not on '{base_name}' (signature {signature}). Retrain it on this base model, or use its own base."
            )
