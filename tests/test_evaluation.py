"""`loramix eval` on the tiny model: configs, cache keys, files, resume, corrupted lines, the report."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from loramix.bundle import Bundle, BundleFingerprint
from loramix.errors import LoramixError
from loramix.eval_configs import EvalConfig, item_key, parse_configs
from loramix.evaluation import EvalPlan, run_evaluation
from loramix.generation import MixtureModel
from loramix.report import (
    Scores,
    bootstrap_mean_ci,
    highest_as_shown,
    own_expert_gains,
    paired_comparisons,
    shared_item_averages,
    verdict,
    write_report,
)
from loramix.tasks import TASKS as TASKS_BY_NAME

TASKS = ("gsm8k", "arc", "codealpaca")  # the tiny bundle has no squad expert


def test_parse_configs(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    names = [c.name for c in parse_configs("paper", bundle)]
    assert names == ["base", "oracle", "tla:k=1", "tla:k=2", "tla:k=3", "tla:k=4"]
    configs = parse_configs("tla:k=2,decode=recompute,merge=linear,expert:arc,prompt,route=softmax:0.1,arrow", bundle)
    assert [c.name for c in configs] == [
        "tla:k=2,decode=recompute,merge=linear",
        "expert:arc",
        "prompt,route=softmax:0.1",
        "arrow",
    ]
    assert configs[0].every_k == 2 and configs[0].decode == "recompute" and configs[0].merge == "linear"
    assert configs[2].route_for("gsm8k", bundle) == "prompt:softmax:0.1"
    assert parse_configs("oracle", bundle)[0].route_for("arc", bundle) == "oracle:arc"
    assert parse_configs("tla:k=2,merge=paper", bundle)[0].merge == "paper"  # 'paper' as a value is no shorthand


@pytest.mark.parametrize(
    "spec,message",
    [
        ("tla", "needs k"),
        ("tla:k=0", "k must be positive"),
        ("tla:k=two", "whole number"),
        ("expert:poetry", "no expert"),
        ("best", "Unknown config"),
        ("tla:k=2,decode=lazy", "decode must be"),
        ("tla:k=2,merge=avg", "Unknown merge mode .avg."),
    ],
)
def test_bad_configs(tiny_bundle, spec, message):
    with pytest.raises(LoramixError, match=message):
        parse_configs(spec, Bundle.load(tiny_bundle))


def test_keys_change_only_with_what_a_config_depends_on(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    bundle = Bundle.load(copy)
    configs = {c.name: c for c in parse_configs("base,oracle,tla:k=2,uniform", bundle)}
    before = {
        (n, t): item_key(c, t, bundle, BundleFingerprint.of(bundle), "test") for n, c in configs.items() for t in TASKS
    }
    # retrain (here: perturb) the arc expert and rebuild the router
    weights = copy / "experts" / "arc" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    (copy / "router.safetensors").write_bytes((copy / "router.safetensors").read_bytes() + b" ")
    after = {
        (n, t): item_key(c, t, bundle, BundleFingerprint.of(bundle), "test") for n, c in configs.items() for t in TASKS
    }
    changed = {cell for cell in before if before[cell] != after[cell]}
    assert ("base", "gsm8k") not in changed and ("base", "arc") not in changed
    assert ("oracle", "arc") in changed and ("oracle", "gsm8k") not in changed
    assert all(("tla:k=2", t) in changed and ("uniform", t) in changed for t in TASKS)
    recompute = EvalConfig(kind="tla", every_k=2, decode="recompute")
    assert item_key(recompute, "arc", bundle, BundleFingerprint.of(bundle), "test") != after[("tla:k=2", "arc")]


@pytest.fixture
def counted_generate(monkeypatch):
    calls = {"prompts": 0}
    original = MixtureModel.generate

    def counting(self, prompts, *args, **kwargs):
        calls["prompts"] += 1 if isinstance(prompts, str) else len(prompts)
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(MixtureModel, "generate", counting)
    return calls


def _plan(tiny_bundle, tiny_data, out, configs="base,oracle,tla:k=1,tla:k=2", limit=2):
    # 12 new tokens at most: the tiny random model never ends an answer, and the machinery is what is tested here
    return EvalPlan(
        bundle=tiny_bundle, tasks=TASKS, configs=configs, out=out, limit=limit, batch_size=2, data=tiny_data,
        max_new_tokens=12, device="cpu", dtype="fp32",
    )  # fmt: skip


def test_end_to_end_eval_writes_items_and_resumes(tiny_bundle, tiny_data, tmp_path, counted_generate):
    out = tmp_path / "eval"
    store = run_evaluation(_plan(tiny_bundle, tiny_data, out), progress=False)
    assert counted_generate["prompts"] == 4 * 3 * 2  # configs x tasks x items
    lines = (out / "items.jsonl").read_text().splitlines()
    assert len(lines) == 24 and len(store.records) == 24
    record = json.loads(lines[-1])
    assert {"key", "config", "task", "id", "prediction", "scores", "seconds"} <= set(record)
    arc = [json.loads(line) for line in lines if '"task": "arc"' in line]
    assert all("loglik_accuracy" in r["scores"] and r["loglik_choice"] in "AB" for r in arc)
    assert all(len(r["weights_mean"]) == 3 for r in arc if r["config"].startswith("tla"))

    counted_generate["prompts"] = 0
    run_evaluation(_plan(tiny_bundle, tiny_data, out), progress=False)
    assert counted_generate["prompts"] == 0, "a finished run is not redone"

    run_evaluation(_plan(tiny_bundle, tiny_data, out, limit=3), progress=False)
    assert counted_generate["prompts"] == 4 * 2, "a larger limit scores only the new items (codealpaca has only 2)"


def test_a_half_written_line_is_redone_not_counted(tiny_bundle, tiny_data, tmp_path, counted_generate):
    out = tmp_path / "eval"
    run_evaluation(_plan(tiny_bundle, tiny_data, out, configs="base"), progress=False)
    items = out / "items.jsonl"
    lines = items.read_text().splitlines()
    items.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    counted_generate["prompts"] = 0
    store = run_evaluation(_plan(tiny_bundle, tiny_data, out, configs="base"), progress=False)
    assert store.dropped == 1 and counted_generate["prompts"] == 1
    rewritten = items.read_text().splitlines()
    assert len(rewritten) == len(lines) and all(json.loads(line) for line in rewritten)


def test_report_files_claims_and_plots(tiny_bundle, tiny_data, tmp_path):
    out = tmp_path / "eval"
    run_evaluation(_plan(tiny_bundle, tiny_data, out, configs="base,oracle,tla:k=1,tla:k=2,expert:arc"), progress=False)
    results = write_report(out, {"experts": ["gsm8k", "arc", "codealpaca"], "base_model": "tiny"})
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    assert (out / "score_vs_k.png").stat().st_size > 0 and (out / "routing_weights.png").stat().st_size > 0
    table = results["table"]
    assert table["tla:k=2"]["gsm8k"]["n"] == 2 and "average" in table["tla:k=2"]
    low, high = table["base"]["arc"]["metrics"]["accuracy"]["ci"]
    assert 0.0 <= low <= table["base"]["arc"]["metrics"]["accuracy"]["mean"] <= high <= 1.0
    assert [c["claim"] for c in results["claims"]] == [1, 2, 3]
    claim = results["claims"][0]  # three tasks here: never "held" (the claim is about all four)
    worst = [verdict(*p["ci"]) for p in claim["evidence"]]
    assert claim["verdict"] == ("not held" if "not held" in worst else "inconclusive") and len(worst) == 3
    assert any(p["versus"] == "oracle" and p["task"] == "average" for p in results["paired"])
    markdown = (out / "results.md").read_text()
    assert "## Main table" in markdown and "## Specialist matrix" in markdown and "## The paper's claims" in markdown
    assert [g["task"] for g in results["own_expert_vs_base"]] == ["gsm8k", "arc", "codealpaca"]
    assert "own expert minus the base model, paired" in markdown


def test_bootstrap_and_verdicts():
    import numpy as np

    low, high = bootstrap_mean_ci(np.array([0.0, 1.0] * 50))
    assert low < 0.5 < high and high - low < 0.25
    assert bootstrap_mean_ci(np.ones(10)) == (1.0, 1.0)
    assert verdict(0.01, 0.2) == "held" and verdict(-0.2, -0.01) == "not held" and verdict(-0.1, 0.1) == "inconclusive"


def test_eval_cli_runs_and_reports(tiny_bundle, tiny_data, tmp_path):
    from test_cli import run_cli

    out = tmp_path / "cli_eval"
    done = run_cli("eval", "--bundle", str(tiny_bundle), "--tasks", "arc", "--configs", "base,tla:k=2", "--limit", "2",
                   "--out", str(out), "--data-dir", str(tiny_data), "--max-new-tokens", "4",
                   "--dtype", "fp32")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "primary metric" in done.stdout and (out / "results.md").is_file()
    from test_cli import run_in_process

    code, _, err = run_in_process("eval", "--bundle", str(tiny_bundle), "--tasks", "squad", "--configs", "oracle",
                                  "--out", str(out), "--data-dir", str(tiny_data))  # fmt: skip
    assert code == 2 and "no expert for task 'squad'" in err


def test_claim_averages_compare_configs_on_the_items_they_share():
    # k=2 has run on four items (the last two score 0), k=1 only on the first two: on those two they tie.
    records = [
        {"config": "tla:k=2", "task": "arc", "id": i, "scores": {"accuracy": v}} for i, v in zip("abcd", (1, 1, 0, 0))
    ]
    records += [{"config": "tla:k=1", "task": "arc", "id": i, "scores": {"accuracy": 1.0}} for i in "ab"]
    averages = shared_item_averages(Scores.from_records(records), ["tla:k=2", "tla:k=1"])
    assert averages == {"tla:k=2": 1.0, "tla:k=1": 1.0}


def test_the_highest_average_names_every_config_that_prints_the_same():
    # Four k that all print 23.7 must not read as a win for whichever is ahead in the fourth decimal.
    assert highest_as_shown({"tla:k=2": 0.23702, "tla:k=1": 0.23704, "tla:k=3": 0.2369}) == (
        "tla:k=2, tla:k=1, tla:k=3 (equal to one decimal)"
    )
    assert highest_as_shown({"tla:k=2": 0.25, "tla:k=1": 0.237}) == "tla:k=2"


def test_each_tla_variant_is_compared_with_its_plain_k():
    values = {"tla:k=2": (1, 1, 0), "tla:k=2,decode=recompute": (1, 1, 1), "tla:k=2,merge=paper": (0, 0, 0)}
    records = [
        {"config": config, "task": "arc", "id": i, "scores": {"accuracy": v}}
        for config, scored in values.items()
        for i, v in zip("abc", scored)
    ]
    rows = paired_comparisons(Scores.from_records(records))
    differences = {(r["config"], r["versus"], r["task"]): r["difference"] for r in rows}
    assert differences[("tla:k=2,decode=recompute", "tla:k=2", "arc")] == pytest.approx(1 / 3)
    assert differences[("tla:k=2,merge=paper", "tla:k=2", "arc")] == pytest.approx(-2 / 3)
    assert not any(r["versus"] == "tla:k=2,merge=paper" for r in rows)


def test_own_expert_gain_is_the_oracle_minus_base_on_each_task():
    values = {("base", "arc"): (0, 1, 0, 0), ("oracle", "arc"): (1, 1, 1, 0), ("base", "gsm8k"): (1, 1, 0, 0)}
    records = [
        {"config": config, "task": task, "id": i, "scores": {TASKS_BY_NAME[task].primary_metric: v}}
        for (config, task), scored in values.items()
        for i, v in zip("abcd", scored)
    ]
    gains = own_expert_gains(Scores.from_records(records))
    assert [(g["task"], g["n"]) for g in gains] == [("arc", 4)], "gsm8k has no oracle items: no gain claimed there"
    assert gains[0]["difference"] == pytest.approx(0.5)


def test_a_run_with_other_settings_is_refused_before_it_mixes_into_the_report(tiny_bundle, tiny_data, tmp_path):
    out = tmp_path / "mixed"
    smoke = dataclasses.replace(_plan(tiny_bundle, tiny_data, out, configs="tla:k=1", limit=1), max_new_tokens=2)
    run_evaluation(smoke, progress=False)
    before = (out / "items.jsonl").read_text()
    with pytest.raises(LoramixError, match="another --out"):  # base is new here; tla:k=1's settings differ
        run_evaluation(_plan(tiny_bundle, tiny_data, out, configs="base,tla:k=1", limit=1), progress=False)
    assert (out / "items.jsonl").read_text() == before, "refused before anything ran: base was not scored either"
    run_evaluation(smoke, progress=False)  # the same settings still resume


def test_stored_predictions_scored_by_older_metrics_are_rescored_without_generating(
    tiny_bundle, tiny_data, tmp_path, counted_generate
):
    from loramix.eval_configs import SCORING_VERSION
    from loramix.evaluation import load_records, rescore

    out = tmp_path / "eval"
    run_evaluation(_plan(tiny_bundle, tiny_data, out, configs="base"), progress=False)
    items = out / "items.jsonl"
    records = [json.loads(line) for line in items.read_text().splitlines()]
    assert all(r["scoring"] == SCORING_VERSION for r in records)
    # as the first results were: no scoring version, and ARC's "A brick wall" read as option A (the gold here)
    arc = next(r for r in records if r["task"] == "arc")
    arc["prediction"], arc["scores"]["accuracy"] = " A brick wall", 1.0
    for r in records:
        del r["scoring"]
    items.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(LoramixError, match="--rescore"):
        load_records(out)

    counted_generate["prompts"] = 0
    changes = rescore(out, tiny_data)
    assert counted_generate["prompts"] == 0, "nothing is generated again"
    arc_change = next(c for c in changes if c["task"] == "arc")
    assert arc_change["changed"] == 1 and arc_change["new_mean"] < arc_change["old_mean"]
    again = {r["id"]: r for r in load_records(out)}
    assert again[arc["id"]]["scores"]["accuracy"] == 0.0
    assert "loglik_accuracy" in again[arc["id"]]["scores"], "the log-likelihood choice is kept"
    assert len(again) == len(records)


def test_routing_accuracy_counts_items_whose_largest_weight_is_their_own_expert():
    from loramix.report import Scores, routing_accuracy

    def record(config, task, item, weights):
        return {"config": config, "task": task, "id": item, "scores": {"x": 1.0}, "weights_mean": weights}

    records = [
        record("tla:k=2", "arc", "a1", [0.1, 0.7, 0.2]),
        record("tla:k=2", "arc", "a2", [0.5, 0.3, 0.2]),
        record("tla:k=2", "gsm8k", "g1", [0.6, 0.2, 0.2]),
        record("uniform", "arc", "a1", [1 / 3, 1 / 3, 1 / 3]),  # a fixed policy: not routing, not counted
    ]
    accuracy = routing_accuracy(
        Scores.from_records(records), ["gsm8k", "arc", "codealpaca"], {"gsm8k": "gsm8k", "arc": "arc"}
    )
    assert accuracy == {
        "tla:k=2": {
            "arc": {"n": 2, "top_is_own": 0.5, "own_weight": 0.5},
            "gsm8k": {"n": 1, "top_is_own": 1.0, "own_weight": 0.6},
        }
    }


@pytest.mark.parametrize(("folder", "split"), [("smollm2-135m", "test"), ("smollm2-135m-validation", "validation")])
def test_every_stored_result_keeps_its_name_and_cache_key(folder, split):
    """A refactor of configs or keys must not orphan the committed results: each stored cell's config name parses
    back to itself, and today's key for it is the one stored (routing at bf16 or fp32, as the run resolved it)."""
    from collections import defaultdict
    from pathlib import Path

    from loramix.bundle import Bundle, packaged_bundle_path

    items = Path(__file__).resolve().parents[1] / "results" / folder / "items.jsonl"
    bundle = Bundle.load(packaged_bundle_path())
    fingerprints = [BundleFingerprint.of(bundle, dtype) for dtype in ("bf16", "fp32")]
    stored = defaultdict(set)
    for line in items.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        stored[(record["config"], record["task"])].add(record["key"])
    assert len(stored) > 30
    for (name, task), keys in stored.items():
        (config,) = parse_configs(name, bundle)
        assert config.name == name
        assert keys & {item_key(config, task, bundle, f, split) for f in fingerprints}, (name, task)
