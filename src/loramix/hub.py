"""Task data from the Hugging Face Hub through `datasets`: the online path beside the offline data folder.

`--data-dir hub` (or LORAMIX_DATA=hub) loads each task's dataset by its Hub id, downloaded once into the `datasets`
cache; `--data-dir hub:FOLDER` loads the same repositories from a local mirror (FOLDER/openai/gsm8k/..., as
`huggingface-cli download --repo-type dataset` writes them), with no network at all. Each task turns the rows into
examples with the same code whichever way they came (`loramix.tasks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loramix.errors import LoramixError

HUB_PREFIX = "hub"


@dataclass(frozen=True)
class HubData:
    mirror: Path | None = None  # a local folder mirroring the Hub's dataset repositories, else the Hub itself

    @classmethod
    def parse(cls, spec: str) -> HubData | None:
        """'hub' or 'hub:FOLDER' -> HubData; anything else -> None (a data folder)."""
        if spec == HUB_PREFIX:
            return cls()
        if spec.startswith(HUB_PREFIX + ":"):
            mirror = Path(spec[len(HUB_PREFIX) + 1 :]).expanduser()
            if not mirror.is_dir():
                raise LoramixError(f"The Hub mirror {mirror} (from '{spec}') does not exist.")
            return cls(mirror.resolve())
        return None

    def __str__(self) -> str:
        return f"the Hub mirror {self.mirror}" if self.mirror else "the Hugging Face Hub (through datasets)"

    def rows(self, repo: str, config: str | None, split: str) -> list[dict]:
        """All rows of one split of one dataset, as plain dicts."""
        try:
            import datasets
        except ImportError:
            raise LoramixError(
                "Loading task data from the Hub needs the `datasets` package: pip install 'loramix[hub]'."
            ) from None
        datasets.disable_progress_bars()
        where = str(self.mirror / repo) if self.mirror else repo
        try:
            return datasets.load_dataset(where, config, split=split).to_list()
        except Exception as exc:  # no network, no such repo or split, a broken cache: datasets raises many kinds
            raise LoramixError(
                f"Could not load {repo} (config {config}, split {split}) from {self}: {type(exc).__name__}: {exc}. "
                "Offline, point --data-dir (or LORAMIX_DATA) at a task data folder instead (see README, 'Data')."
            ) from exc
