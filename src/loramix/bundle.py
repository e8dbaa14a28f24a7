"""A bundle is a directory holding everything token-level adaptation needs:

bundle.json            base model, embedder, expert names in order, their folders, router file
experts/<name>/        standard PEFT adapter folders
router.safetensors     float32 `centroids` [n_experts, dim], rows in bundle.json's expert order
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from loramix import __version__
from loramix.adapters import ExpertAdapter, load_expert
from loramix.errors import LoramixError
from loramix.hidden_router import HIDDEN_ROUTER_FILE, build_hidden_centroids, save_hidden_centroids
from loramix.mixture import attach_experts, detach_experts
from loramix.models import DEFAULT_BASE_MODEL, DEFAULT_EMBEDDER, base_model_signature, load_base_model
from loramix.paths import REPO_ROOT, data_dir, loramix_home
from loramix.router import Embedder, build_centroids, load_centroids, save_centroids
from loramix.tasks import TASKS, get_task

BUNDLE_FILE = "bundle.json"
ROUTER_FILE = "router.safetensors"
FORMAT = "loramix-bundle/1"


@dataclass
class ExpertEntry:
    name: str
    path: str  # relative to the bundle root
    task: str | None = None


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


def packaged_bundle_path() -> Path:
    """The trained default bundle that ships with the project (may not exist yet)."""
    return REPO_ROOT / "bundles" / "smollm2-135m"


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


def _adopt_expert(root: Path, name: str, source: Path) -> Path:
    """Copy an adapter folder into the bundle (bundles are self-contained) unless it is already there."""
    target = root / "experts" / name
    if source.resolve() != target.resolve():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "checkpoint-*"))
    return target


HIDDEN_CENTROID_TEXTS = ("prompts", "training")


def build_hidden_router(
    root: str | Path, max_examples: int = 300, data: str | Path | None = None, batch_size: int = 8,
    texts: str = "prompts",
) -> Path:  # fmt: skip
    """Hidden-state centroids for a bundle (`hidden:L/RULE` routes): each expert's task training items (the first
    `max_examples`, as `router build` takes them) through the base model, experts off, every layer pooled.

    texts: "prompts" (the items' prompts alone: what routing sees first; on the validation split these route
    held-out prompts far better than whole training texts, see REPRODUCTION.md) or "training" (prompt + answer)."""
    if texts not in HIDDEN_CENTROID_TEXTS:
        raise LoramixError(f"--texts must be one of {', '.join(HIDDEN_CENTROID_TEXTS)}, got '{texts}'.")
    from rich.progress import Progress

    bundle = Bundle.load(root)
    model, tokenizer = load_base_model(bundle.base_model)
    tokenizer.padding_side = "right"  # plain padding: the mean is taken over each text's own tokens
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    items = {e.name: get_task(e.task).load(data_dir(data), "train")[:max_examples] for e in bundle.experts}
    chosen = {
        name: [x.prompt if texts == "prompts" else x.training_text for x in examples]
        for name, examples in items.items()
    }
    with Progress() as bar:
        job = bar.add_task("hidden-state centroids", total=sum(len(t) for t in chosen.values()))
        centroids = build_hidden_centroids(
            model, tokenizer, chosen, batch_size=batch_size, progress=lambda n: bar.advance(job, n)
        )
    path = bundle.root / HIDDEN_ROUTER_FILE
    save_hidden_centroids(path, centroids, bundle.expert_names, max_examples)
    bundle.info["hidden_router"] = {"texts": texts, "examples": {name: len(t) for name, t in chosen.items()}}
    bundle.save()
    return path


def build_bundle(
    root: str | Path,
    experts: Mapping[str, str | Path] | None = None,
    base_model: str = DEFAULT_BASE_MODEL,
    embedder: str = DEFAULT_EMBEDDER,
    data: str | Path | None = None,
    max_examples: int | None = None,
    progress: bool = False,
) -> Bundle:
    """Gather experts into `root`, check they fit the base model, embed each task's training texts, save.

    `experts` maps expert name -> adapter folder; if omitted, every folder under root/experts/ is used.
    Each expert's task comes from its loramix_expert.json, else from its name if that is a task name.
    """
    root = Path(root)
    if experts is None:
        folder = root / "experts"
        found = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not found:
            raise LoramixError(f"No experts given and {folder} holds none. Pass --expert NAME=DIR (repeatable).")
        experts = {p.name: p for p in found}
    root.mkdir(parents=True, exist_ok=True)
    adapters = [load_expert(Path(path), name) for name, path in experts.items()]

    model, _ = load_base_model(base_model)
    signature = base_model_signature(model)
    check_same_base(adapters, signature, base_model)
    attach_experts(model, adapters)  # raises a clear error if any shape does not fit this base model
    detach_experts(model)
    del model

    entries, texts = [], {}
    data_root = data_dir(data)
    for adapter in adapters:
        task_name = adapter.task or (adapter.name if adapter.name in TASKS else None)
        if task_name is None:
            raise LoramixError(
                f"Expert '{adapter.name}' has no task recorded (no loramix_expert.json) and its name is not a task "
                f"({', '.join(TASKS)}). Name it after its task, e.g. --expert gsm8k=DIR."
            )
        examples = get_task(task_name).load(data_root, "train")[:max_examples]
        texts[adapter.name] = [example.training_text for example in examples]
        target = _adopt_expert(root, adapter.name, adapter.path)
        entries.append(ExpertEntry(name=adapter.name, path=str(target.relative_to(root)), task=task_name))

    emb = Embedder(embedder)
    centroids = build_centroids(emb, texts, progress=progress)
    save_centroids(root / ROUTER_FILE, centroids, [e.name for e in entries], embedder)
    bundle = Bundle(
        root=root,
        base_model=base_model,
        embedder=embedder,
        experts=entries,
        base_model_signature=signature,
        info={
            "loramix_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "router_examples": {name: len(t) for name, t in texts.items()},
            "router_split": "train",
        },
    )
    bundle.save()
    return bundle
