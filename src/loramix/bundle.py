"""A bundle is a directory holding everything token-level adaptation needs:

bundle.json            base model, embedder, expert names in order, their folders, router file
experts/<name>/        standard PEFT adapter folders
router.safetensors     float32 `centroids` [n_experts, dim], rows in bundle.json's expert order (text router)
router_hidden.safetensors  float32 `centroids` [n_layers + 1, n_experts, hidden] (hidden-state router)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loramix.adapters import ExpertAdapter, load_expert
from loramix.centroids import load_centroids
from loramix.errors import LoramixError
from loramix.hidden_router import (
    HIDDEN_ROUTER_FILE,
)
from loramix.models import DEFAULT_EMBEDDER
from loramix.paths import PACKAGE_ROOT, loramix_home

BUNDLE_FILE = "bundle.json"
ROUTER_FILE = "router.safetensors"
FORMAT = "loramix-bundle/1"


@dataclass
class ExpertEntry:
    name: str
    path: str  # relative to the bundle root
    task: str | None = None  # the built-in task whose texts describe it, if any
    texts: str | None = None  # else its file of example prompts (relative to the root) the router rows came from


@dataclass
class Bundle:
    root: Path
    base_model: str
    embedder: str
    experts: list[ExpertEntry]
    router: str = ROUTER_FILE
    base_model_signature: str | None = None
    info: dict = field(default_factory=dict)  # provenance: versions, dates, router data sizes

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @classmethod
    def load(cls, root: str | Path) -> Bundle:
        root = Path(root)
        manifest = root / BUNDLE_FILE
        if not manifest.is_file():
            raise LoramixError(
                f"{root} is not a bundle: {BUNDLE_FILE} is missing. Build one with `loramix router build {root}`."
            )
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            experts = [ExpertEntry(**entry) for entry in data["experts"]]
            bundle = cls(
                root=root,
                base_model=data["base_model"],
                embedder=data.get("embedder", DEFAULT_EMBEDDER),
                experts=experts,
                router=data.get("router", ROUTER_FILE),
                base_model_signature=data.get("base_model_signature"),
                info=data.get("info", {}),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LoramixError(f"{manifest} is corrupt ({exc}); rebuild it with `loramix router build`.") from exc
        if not experts:
            raise LoramixError(f"{manifest} lists no experts.")
        return bundle

    def save(self) -> None:
        data = {
            "format": FORMAT,
            "base_model": self.base_model,
            "base_model_signature": self.base_model_signature,
            "embedder": self.embedder,
            "experts": [asdict(e) for e in self.experts],
            "router": self.router,
            "info": self.info,
        }
        (self.root / BUNDLE_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def load_experts(self, dtype: torch.dtype = torch.float32) -> list[ExpertAdapter]:
        return [load_expert(self.root / e.path, e.name, dtype) for e in self.experts]

    def load_centroids(self) -> torch.Tensor:
        return load_centroids(self.root / self.router, len(self.experts))


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass
class BundleFingerprint:
    """Digests of a bundle's files: equal fingerprints, equal outputs (eval cache keys, Ray replicas)."""

    base: str
    experts: dict[str, str]
    router: str
    hidden_router: str | None = None  # the hidden-state centroids, where the bundle has them

    @classmethod
    def of(cls, bundle: Bundle, embedder_dtype: str = "fp32") -> BundleFingerprint:
        """What a bundle's outputs depend on: base model, each expert's files, the router's file and embedder.

        embedder_dtype: the resolved routing precision ("fp32" or "bf16"), part of the router's identity."""
        experts = {
            e.name: _file_digest(bundle.root / e.path / "adapter_model.safetensors")
            + _file_digest(bundle.root / e.path / "adapter_config.json")
            for e in bundle.experts
        }
        router = f"{_file_digest(bundle.root / bundle.router)}|{bundle.embedder}|{embedder_dtype}"
        hidden = bundle.root / HIDDEN_ROUTER_FILE
        return cls(
            base=f"{bundle.base_model}|{bundle.base_model_signature}", experts=experts, router=router,
            hidden_router=_file_digest(hidden) if hidden.is_file() else None,
        )  # fmt: skip

    def digest(self) -> str:
        """One short string for the whole fingerprint."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


def packaged_bundle_path() -> Path:
    """The trained default bundle that ships with the project (may not exist yet)."""
    return PACKAGE_ROOT / "bundles" / "smollm2-135m"  # package data: there in a checkout and in an installed wheel


def quick_bundle_path() -> Path:
    """Where `loramix demo` trains a quick bundle when no trained default exists."""
    return loramix_home() / "bundles" / "quick-smollm2-135m"


def default_bundle_path() -> Path | None:
    for candidate in (packaged_bundle_path(), quick_bundle_path()):
        if (candidate / BUNDLE_FILE).is_file():
            return candidate
    return None


def resolve_bundle(path: str | Path | None) -> Path:
    if path is not None:
        return Path(path)
    found = default_bundle_path()
    if found is None:
        raise LoramixError(
            f"No bundle given and the default one ({packaged_bundle_path()}) is missing. Restore it from git "
            "(`git checkout -- bundles`), run `loramix demo` (it trains a quick one), or pass --bundle DIR."
        )
    return found
