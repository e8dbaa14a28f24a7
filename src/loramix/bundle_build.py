"""Building and editing bundles: gather PEFT adapters, check they fit the base model, and build both routers
(MiniLM centroids, hidden-state centroids) from the texts that describe each expert; add or remove one expert
without touching the others' router rows.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch

from loramix import __version__
from loramix.adapters import ExpertAdapter, adapter_folder, check_same_base, load_expert
from loramix.bundle import ROUTER_FILE, Bundle, ExpertEntry
from loramix.centroids import load_centroids, save_centroids
from loramix.errors import LoramixError
from loramix.hardware import Placement
from loramix.hidden_router import (
    HIDDEN_ROUTER_FILE,
    build_hidden_centroids,
)
from loramix.mixture import attach_experts, detach_experts
from loramix.models import DEFAULT_BASE_MODEL, DEFAULT_EMBEDDER, base_model_signature, load_base_model
from loramix.router import Embedder, build_centroids
from loramix.router_texts import HIDDEN_EXAMPLES, RouterTexts, load_router_texts
from loramix.tasks import TASKS


def _adopt_expert(root: Path, name: str, source: Path) -> Path:
    """Copy an adapter folder into the bundle (bundles are self-contained) unless it is already there."""
    target = root / "experts" / name
    if source.resolve() != target.resolve():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "checkpoint-*"))
    return target


def _adopt_texts(root: Path, name: str, source: Path) -> str:
    """Copy an expert's file of router texts into the bundle (texts/NAME.ext), so its rows can be rebuilt."""
    target = root / "texts" / f"{name}{source.suffix.lower()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.expanduser().resolve() != target.resolve():
        shutil.copyfile(source.expanduser(), target)
    return str(target.relative_to(root))


def _adopt(root: Path, adapter: ExpertAdapter, source: RouterTexts) -> ExpertEntry:
    """Copy an expert (and its file of texts, if any) into the bundle; its bundle.json entry."""
    target = _adopt_expert(root, adapter.name, adapter.path)
    texts_file = None if source.task else _adopt_texts(root, adapter.name, Path(source.source))
    return ExpertEntry(adapter.name, str(target.relative_to(root)), source.task, texts_file)


def _placed(placement: Placement | None) -> tuple[torch.device, torch.dtype]:
    """Where centroid building runs (the library's default: fp32 on the CPU, the exactness reference)."""
    return (placement or Placement("cpu", "fp32")).resolve()


def _checked_base_model(base_model: str, adapters: list[ExpertAdapter], placement: Placement | None = None):
    """(model, tokenizer, signature) of the base model, the adapters refused unless they were trained on it and fit
    its shapes; the model comes back plain (experts off)."""
    device, dtype = _placed(placement)
    model, tokenizer = load_base_model(base_model, dtype=dtype, device=device)
    signature = base_model_signature(model)
    check_same_base(adapters, signature, base_model)
    attach_experts(model, adapters)  # raises a clear error if any shape does not fit this base model
    detach_experts(model)
    return model, tokenizer, signature


HIDDEN_CENTROID_TEXTS = ("prompts", "training")


def _texts_source(adapter: ExpertAdapter, texts: Mapping[str, str]) -> str:
    """Where an expert's router texts come from: --texts NAME=..., else its recorded task, else its name."""
    source = texts.get(adapter.name) or adapter.task or (adapter.name if adapter.name in TASKS else None)
    if source is None:
        raise LoramixError(
            f"Expert '{adapter.name}' has no texts for the router: it records no task (no loramix_expert.json) and "
            f"its name is not a task ({', '.join(TASKS)}). Give a file of example prompts with "
            f"--texts {adapter.name}=FILE (.jsonl/.txt/.csv), or a task with --texts {adapter.name}=TASK."
        )
    return source


def _hidden_rows(model, tokenizer, prompts: Mapping[str, list[str]], batch_size: int = 8) -> torch.Tensor:
    """[n_layers + 1, n_experts, hidden] hidden-state centroids of the plain base model, with a progress bar."""
    from rich.progress import Progress

    tokenizer.padding_side = "right"  # plain padding: the mean is taken over each text's own tokens
    with Progress(transient=True) as bar:
        job = bar.add_task("hidden-state centroids", total=sum(len(t) for t in prompts.values()))
        return build_hidden_centroids(
            model, tokenizer, dict(prompts), batch_size=batch_size, progress=lambda n: bar.advance(job, n)
        )


def build_hidden_router(
    root: str | Path, max_examples: int = HIDDEN_EXAMPLES, data: str | Path | None = None, batch_size: int = 8,
    texts: str = "prompts", placement: Placement | None = None,
) -> Path:  # fmt: skip
    """(Re)build a bundle's hidden-state centroids (`hidden` routes) from each expert's router texts.

    texts: "prompts" (a task's prompts alone: what routing sees first; on the validation split these route
    held-out prompts far better than whole training texts, see ROUTING.md) or "training" (prompt + answer).
    Experts described by a file use the file's texts either way."""
    if texts not in HIDDEN_CENTROID_TEXTS:
        raise LoramixError(f"--texts must be one of {', '.join(HIDDEN_CENTROID_TEXTS)}, got '{texts}'.")
    bundle = Bundle.load(root)
    device, dtype = _placed(placement)
    model, tokenizer = load_base_model(bundle.base_model, dtype=dtype, device=device)
    chosen = {}
    for entry in bundle.experts:
        described_by = str(bundle.root / entry.texts) if entry.texts else entry.task or entry.name
        source = load_router_texts(described_by, data, max_examples)
        chosen[entry.name] = source.for_hidden_router if texts == "prompts" else source.for_text_router
    centroids = _hidden_rows(model, tokenizer, chosen, batch_size)
    path = bundle.root / HIDDEN_ROUTER_FILE
    save_centroids(path, centroids, bundle.expert_names, examples_per_expert=max_examples)
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
    texts: Mapping[str, str] | None = None,
    placement: Placement | None = None,
) -> Bundle:
    """Gather experts into `root`, check they fit the base model, build both routers from each expert's texts.

    `experts` maps expert name -> adapter folder; if omitted, every folder under root/experts/ is used.
    `texts` maps expert name -> a task name or a file of example prompts (`router_texts`); an expert not named
    there uses its recorded task (loramix_expert.json), else its name if that is a task name.
    The text router embeds up to `max_examples` texts per expert; the hidden-state router takes the first
    HIDDEN_EXAMPLES of them.
    """
    root = Path(root)
    if experts is None:
        folder = root / "experts"
        found = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not found:
            raise LoramixError(f"No experts given and {folder} holds none. Pass --expert NAME=DIR (repeatable).")
        experts = {p.name: p for p in found}
    unknown = set(texts or {}) - set(experts)
    if unknown:
        raise LoramixError(f"--texts names {', '.join(sorted(unknown))}, which no --expert is called.")
    adapters = [load_expert(adapter_folder(path), name) for name, path in experts.items()]
    sources = {a.name: load_router_texts(_texts_source(a, texts or {}), data, max_examples) for a in adapters}

    model, tokenizer, signature = _checked_base_model(base_model, adapters, placement)
    hidden_texts = {name: source.for_hidden_router[:HIDDEN_EXAMPLES] for name, source in sources.items()}
    hidden = _hidden_rows(model, tokenizer, hidden_texts)
    del model

    root.mkdir(parents=True, exist_ok=True)
    entries = [_adopt(root, adapter, sources[adapter.name]) for adapter in adapters]
    names = [e.name for e in entries]
    text_texts = {name: source.for_text_router for name, source in sources.items()}
    centroids = build_centroids(Embedder(embedder, _placed(placement)[0]), text_texts, progress=progress)
    save_centroids(root / ROUTER_FILE, centroids, names, embedder=embedder)
    save_centroids(root / HIDDEN_ROUTER_FILE, hidden, names, examples_per_expert=HIDDEN_EXAMPLES)
    bundle = Bundle(
        root=root,
        base_model=base_model,
        embedder=embedder,
        experts=entries,
        base_model_signature=signature,
        info={
            "loramix_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "router_examples": {name: len(t) for name, t in text_texts.items()},
            "router_split": "train",
            "hidden_router": {
                "texts": "prompts", "examples": {name: len(t) for name, t in hidden_texts.items()}
            },
        },
    )  # fmt: skip
    bundle.save()
    return bundle


def add_expert(
    root: str | Path, name: str, adapter: str | Path, texts: str | None = None, data: str | Path | None = None,
    max_examples: int | None = None, placement: Placement | None = None,
) -> Bundle:  # fmt: skip
    """Add one expert to a bundle: its text-router row and hidden-state rows are built from its texts alone, the
    other experts' rows are kept as they are."""
    bundle = Bundle.load(root)
    if name in bundle.expert_names:
        raise LoramixError(f"The bundle already has an expert '{name}'; remove it first or choose another name.")
    expert = load_expert(adapter_folder(adapter), name)
    source = load_router_texts(_texts_source(expert, {name: texts} if texts else {}), data, max_examples)
    model, tokenizer, _ = _checked_base_model(bundle.base_model, [expert], placement)
    hidden_file = bundle.root / HIDDEN_ROUTER_FILE
    hidden = None
    if hidden_file.is_file():
        new_rows = _hidden_rows(model, tokenizer, {name: source.for_hidden_router[:HIDDEN_EXAMPLES]})
        hidden = torch.cat([load_centroids(hidden_file, len(bundle.expert_names), rank=3), new_rows], dim=1)
    del model
    row = build_centroids(Embedder(bundle.embedder, _placed(placement)[0]), {name: source.for_text_router})
    centroids = torch.cat([bundle.load_centroids(), row])

    bundle.experts.append(_adopt(bundle.root, expert, source))
    _save_rows(bundle, centroids, hidden)
    bundle.info.setdefault("router_examples", {})[name] = len(source.for_text_router)
    bundle.save()
    return bundle


def remove_expert(root: str | Path, name: str) -> Bundle:
    """Remove one expert (its folder, its texts and its router rows); the others' rows are kept."""
    bundle = Bundle.load(root)
    names = bundle.expert_names
    if name not in names:
        raise LoramixError(f"The bundle has no expert '{name}'; its experts are {', '.join(names)}.")
    if len(names) == 1:
        raise LoramixError(f"'{name}' is the bundle's only expert; a bundle needs at least one.")
    keep = [i for i, n in enumerate(names) if n != name]
    hidden_file = bundle.root / HIDDEN_ROUTER_FILE
    hidden = load_centroids(hidden_file, len(names), rank=3)[:, keep] if hidden_file.is_file() else None
    centroids = bundle.load_centroids()[keep]
    entry = bundle.experts.pop(names.index(name))
    _save_rows(bundle, centroids, hidden)
    bundle.info.get("router_examples", {}).pop(name, None)
    bundle.save()
    folder = bundle.root / entry.path
    if folder.resolve().is_relative_to(bundle.root.resolve()):  # never delete anything outside the bundle
        shutil.rmtree(folder, ignore_errors=True)
    if entry.texts:
        (bundle.root / entry.texts).unlink(missing_ok=True)
    return bundle


def _save_rows(bundle: Bundle, centroids: torch.Tensor, hidden: torch.Tensor | None) -> None:
    names = bundle.expert_names
    save_centroids(bundle.root / bundle.router, centroids, names, embedder=bundle.embedder)
    if hidden is not None:
        save_centroids(bundle.root / HIDDEN_ROUTER_FILE, hidden, names, examples_per_expert=HIDDEN_EXAMPLES)


def describe_experts(root: str | Path) -> list[dict]:
    """One row per expert: name, what describes it to the router, rank, alpha, scaling, adapted modules."""
    bundle = Bundle.load(root)
    rows = []
    for entry, expert in zip(bundle.experts, bundle.load_experts(), strict=True):
        kinds = sorted({module.rsplit(".", 1)[-1] for module in expert.modules})
        rows.append({
            "name": entry.name, "texts": entry.task or entry.texts or "-", "rank": expert.rank, "alpha": expert.alpha,
            "scaling": round(expert.scaling, 4), "modules": len(expert.modules), "targets": ",".join(kinds),
            "path": entry.path,
        })  # fmt: skip
    return rows


def name_value_pairs(values: list[str], flag: str, what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            raise LoramixError(f"{flag} takes NAME={what}, got '{value}'.")
        if name in pairs:
            raise LoramixError(f"{flag} names '{name}' twice.")
        pairs[name] = target
    return pairs
