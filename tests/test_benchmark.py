"""The benchmark harness on the tiny model: every method runs, outputs agree where they must, the report renders.
(Speed targets are checked by `loramix bench`, never by timed tests.)"""

from __future__ import annotations

from loramix.bench import render_markdown, run_benchmark, targets, write_plot


def test_quick_benchmark_runs_and_agrees(tiny_bundle, tiny_data, tmp_path):
    lines = []
    report = run_benchmark(
        tmp_path,
        quick=True,
        bundle=tiny_bundle,
        data=tiny_data,
        tokens=(6,),
        batches=(1, 3),
        with_merge_grid=True,
        progress=lines.append,
    )
    methods = {(c["method"], c["batch"]) for c in report["cells"]}
    assert ("reference", 1) in methods and ("reference", 3) not in methods  # per-sequence method: batch 1 only
    assert {("base", 3), ("ours cached k=1", 3), ("ours-base", 3)} <= methods
    for cell in report["cells"]:
        assert cell["ms_per_step"] > 0 and cell["tokens_per_second"] > 0
        if cell["batch"] == 1:
            assert len(cell["step_ms"]) == 6
    checks = {a["check"]: a["same_tokens"] for a in report["agreement"]}
    assert len(checks) == 3 and all(checks.values()), checks
    assert (tmp_path / "bench.json").is_file() and len(lines) == len(report["cells"]) + len(report["merge_grid"])
    assert len(report["merge_grid"]) == 1 + 2 * 3 * 3  # base + decode x k x merge
    assert write_plot(report, tmp_path / "plot.png")
    text = render_markdown(report, "plot.png", "loramix bench --quick")
    assert "## Targets" in text and "## Outputs that must agree" in text and "## Merge modes" in text
    assert [t["passed"] for t in targets(report)][0] is None  # no 128-token cell in this run: not measured


def test_markdown_rewrite_keeps_sections_measured_elsewhere(tmp_path):
    from loramix.bench import KEPT_MARKER, keep_other_machines

    path = tmp_path / "BENCHMARKS.md"
    assert keep_other_machines(path, "# new\n") == "# new\n"  # no file yet
    path.write_text(f"# old CPU tables\n\n{KEPT_MARKER}\n\n## GPU\n| a | b |\n", encoding="utf-8")
    text = keep_other_machines(path, "# new CPU tables\n")
    assert text.startswith("# new CPU tables") and "old CPU" not in text
    assert text.endswith(f"{KEPT_MARKER}\n\n## GPU\n| a | b |\n")
    path.write_text("# a report without the marker\n", encoding="utf-8")
    assert keep_other_machines(path, "# new\n") == "# new\n"
