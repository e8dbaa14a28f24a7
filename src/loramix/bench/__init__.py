"""`loramix bench`: the speed of token-level adaptation against the reference algorithm and plain decoding.

`methods` (what is timed), `harness` (how it is timed, bench.json), `report` (targets, bench.md, the plot).
"""

from loramix.bench.harness import run_benchmark
from loramix.bench.methods import BenchContext
from loramix.bench.report import (
    KEPT_MARKER,
    keep_other_machines,
    render_markdown,
    targets,
    write_plot,
    write_report_files,
)

__all__ = [
    "KEPT_MARKER", "BenchContext", "keep_other_machines", "render_markdown", "run_benchmark", "targets", "write_plot",
    "write_report_files",
]  # fmt: skip
