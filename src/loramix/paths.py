"""Where loramix keeps its cache and finds task data; every location can be overridden."""

from __future__ import annotations

import os
from pathlib import Path

from loramix.errors import LoramixError

# The repository root when running from a checkout (src/loramix/paths.py -> repo root).
REPO_ROOT = Path(__file__).resolve().parents[2]


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
    return [Path.cwd() / ".." / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]


def data_dir(override: str | Path | None = None) -> Path:
    """Task data directory: the override, else `$LORAMIX_DATA`, else `../shared/data` if it exists."""
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
            "gsm8k/, arc_challenge/, squad_v1.1/ and codealpaca/ (see README, 'Data')."
        )
    if not chosen.is_dir():
        raise LoramixError(f"The data directory {chosen} (from {source}) does not exist.")
    return chosen.resolve()
