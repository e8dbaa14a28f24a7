"""Where loramix keeps its cache and finds task data; every location can be overridden."""

from __future__ import annotations

import os
from pathlib import Path

from loramix.errors import LoramixError
from loramix.hub import HubData

PACKAGE_ROOT = Path(__file__).resolve().parent  # the installed package (package data lives here)
# The repository root when running from a checkout (src/loramix/paths.py -> repo root); else None (installed).
REPO_ROOT: Path | None = PACKAGE_ROOT.parents[1] if (PACKAGE_ROOT.parents[1] / "pyproject.toml").is_file() else None


def loramix_home() -> Path:
    """Cache directory: `$LORAMIX_HOME`, else `~/.cache/loramix`."""
    env = os.environ.get("LORAMIX_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loramix"


def shown_path(path: Path) -> str:
    """The path relative to the working directory when it lies inside it, so a committed report names no machine."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _default_data_candidates() -> list[Path]:
    beside_checkout = [REPO_ROOT.parent / "shared" / "data"] if REPO_ROOT else []
    return [Path.cwd() / ".." / "shared" / "data", *beside_checkout]


def data_dir(override: str | Path | None = None) -> Path | HubData:
    """Where task data comes from: the override, else `$LORAMIX_DATA`, else `../shared/data` if it exists.

    Each of the first two is a folder, or `hub` / `hub:MIRROR` for the Hugging Face Hub (`loramix.hub`)."""
    for spec in (override, os.environ.get("LORAMIX_DATA") if override is None else None):
        hub = HubData.parse(str(spec)) if spec else None
        if hub is not None:
            return hub
    if override is not None:
        chosen = Path(override).expanduser()
        source = "--data-dir"
    elif os.environ.get("LORAMIX_DATA"):
        chosen = Path(os.environ["LORAMIX_DATA"]).expanduser()
        source = "LORAMIX_DATA"
    else:
        for candidate in _default_data_candidates():
            if candidate.is_dir():
                return candidate.resolve()
        raise LoramixError(
            "No task data directory found. Pass --data-dir DIR or set LORAMIX_DATA to a folder holding "
            "gsm8k/, arc_challenge/, squad_v1.1/ and codealpaca/, or --data-dir hub to load the tasks from the "
            "Hugging Face Hub (see README, 'Data')."
        )
    if not chosen.is_dir():
        raise LoramixError(f"The data directory {chosen} (from {source}) does not exist.")
    return chosen.resolve()
