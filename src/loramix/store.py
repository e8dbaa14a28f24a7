"""The resumable item store: one JSON line per scored item, appended and flushed as each batch finishes, so a
killed run loses nothing finished and a re-run skips what is there. `loramix eval` (items.jsonl) and
`loramix specialist` (answer_loss.jsonl) both keep their results in one; data-parallel ranks each write their own
file (STEM.rankR.jsonl) and every file is read back together.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_FIELDS = ("key", "config", "task", "id", "prediction", "scores")


@dataclass
class ItemStore:
    """Scored items as JSON lines; appends are flushed to disk so a kill loses nothing finished."""

    folder: Path
    rank: int = 0
    stem: str = "items"  # file name: STEM.jsonl (rank 0), STEM.rankR.jsonl
    required: tuple[str, ...] = REQUIRED_FIELDS
    dropped: int = 0
    records: dict[tuple[str, str], dict] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder / (f"{self.stem}.jsonl" if self.rank == 0 else f"{self.stem}.rank{self.rank}.jsonl")

    def load(self) -> ItemStore:
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.folder.glob(f"{self.stem}.*jsonl")):
            lines = path.read_text(encoding="utf-8").splitlines()
            good_lines = []
            for line in lines:
                record = parse_record(line, self.required)
                if record is None:
                    self.dropped += 1
                    continue
                good_lines.append(line)
                self.records[(record["key"], record["id"])] = record
            if len(good_lines) != len(lines) and path == self.path:
                # rewrite without the broken lines (atomically) so they are redone, not counted
                staging = path.with_suffix(".tmp")
                staging.write_text("".join(line + "\n" for line in good_lines), encoding="utf-8")
                os.replace(staging, path)
        return self

    def has(self, key: str, item_id: str) -> bool:
        return (key, item_id) in self.records

    def keys_by_cell(self) -> dict[tuple[str, str], set[str]]:
        """The item keys stored per (config, task): one each, unless runs with different settings met."""
        cells: dict[tuple[str, str], set[str]] = defaultdict(set)
        for record in self.records.values():
            cells[(record["config"], record["task"])].add(record["key"])
        return cells

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        with self.path.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for record in records:
            self.records[(record["key"], record["id"])] = record


def parse_record(line: str, required: tuple[str, ...]) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or any(f not in record for f in required):
        return None
    if "scores" in required and not isinstance(record["scores"], dict):
        return None
    return record
