"""Held-out tasks (BIG-Bench Hard, HumanEval) and the gold-answer loss of any config, with routing recomputed at every
gold token exactly as generation would."""

from __future__ import annotations

import json

import pytest
import torch

from loramix.errors import LoramixError
from loramix.evaluation import EvalPlan
from loramix.sequences import GenerationOptions
from loramix.specialist import answer_losses, routed_answer_losses, run_answer_losses
from loramix.tasks import TASK_GROUPS, get_task, parse_tasks
from loramix.tasks.base import Example
from loramix.tasks.bbh import answer_of, score_bbh


@pytest.mark.parametrize(
    "prediction,target,right",
    [
        (" (B) because the cat sat", "(B)", True), (" B.", "(B)", True), ("(b)", "(B)", True),
        (" A) no", "(B)", False), (" Bob is", "(B)", False),
        (" True.", "True", True), (" true, since", "True", True), (" False", "True", False),
        (" yes\nno", "Yes", True), (" valid", "valid", True), (" invalid", "valid", False),
        (" 24 apples", "24", True), (" -3", "-3", True), (" 2 4", "24", False),
        (" ] ] )", "] ] )", True), ("  ]  ]  ) .", "] ] )", True), (" ] )", "] ] )", False),
        ("\n\n(C)\n", "(C)", True),
    ],
)  # fmt: skip
def test_bbh_answers_are_read_the_usual_way(prediction, target, right):
    example = Example(id="x", prompt="p", target=target, references=(target,))
    assert score_bbh(prediction, example)["exact_match"] == float(right), answer_of(prediction, target)


def test_bbh_halves_are_disjoint_fixed_and_whole(tiny_data):
    task = get_task("bbh_boolean_expressions")
    validation, test = task.load(tiny_data, "validation"), task.load(tiny_data, "test")
    assert len(validation) == len(test) == 5 and not {e.id for e in validation} & {e.id for e in test}
    assert [e.id for e in test] == [e.id for e in task.load(tiny_data, "test")]
    assert test[0].prompt.startswith("Question: not ( ") and test[0].prompt.endswith("\n\nAnswer:")
    assert task.held_out and not get_task("gsm8k").held_out


def test_task_groups_expand_and_unknown_tasks_are_refused():
    assert parse_tasks("bbh")[0] == "bbh_boolean_expressions" and len(parse_tasks("bbh")) == 20
    assert parse_tasks("gsm8k,held-out,gsm8k") == ("gsm8k", *TASK_GROUPS["held-out"])
    with pytest.raises(LoramixError, match="bbh_<name>"):
        parse_tasks("bbh_knitting")


def test_humaneval_runs_completions_in_their_own_limited_process(tmp_path, monkeypatch):
    from loramix.tasks import humaneval

    monkeypatch.setattr(humaneval, "TIMEOUT_SECONDS", 2)
    problems = get_task("humaneval").load(None, "test") + get_task("humaneval").load(None, "validation")
    assert len(problems) == 164 and problems[0].separator == ""
    problem = next(e for e in problems if e.id == "HumanEval/0")
    assert humaneval.score_humaneval(problem.target, problem) == {"pass_at_1": 1.0}  # the canonical body passes
    assert humaneval.score_humaneval("    return None\n", problem)["pass_at_1"] == 0.0
    assert humaneval.score_humaneval("    while True:\n        pass\n", problem)["pass_at_1"] == 0.0  # timed out
    assert humaneval.score_humaneval("    x = bytearray(8 * 2**30)\n", problem)["pass_at_1"] == 0.0  # over memory
    monkeypatch.chdir(tmp_path)
    humaneval.passes("open('written_here', 'w').write('x')\n")
    assert not (tmp_path / "written_here").exists()  # it ran elsewhere, in a folder of its own


def test_forced_gold_tokens_give_the_losses_of_generation_itself(tiny_mixture):
    """Force the greedy output as the 'gold answer': its loss must be minus the mean log-probability generation
    gave those very tokens, routing (hidden, every token) recomputed exactly as it was."""
    prompt = "Question: What is 2 + 3?\n\nAnswer:"
    options = GenerationOptions(every_k=1, route="hidden", max_new_tokens=12, min_new_tokens=12, logprobs=0)
    generated = tiny_mixture.generate(prompt, options)
    answer = tiny_mixture.tokenizer.decode(generated.token_ids)
    assert tiny_mixture.tokenizer(answer, add_special_tokens=False).input_ids == generated.token_ids
    example = Example(id="g", prompt=prompt, target=answer, separator="")
    ((nll, n),) = routed_answer_losses(tiny_mixture, [example], GenerationOptions(every_k=1, route="hidden"))
    assert n == 12 and nll == pytest.approx(-sum(generated.logprobs) / 12, abs=1e-6)


def test_fixed_weights_forced_through_the_engine_equal_one_teacher_forced_pass(tiny_mixture, tiny_data):
    examples = get_task("gsm8k").load(tiny_data, "test")[:3]
    one_pass = answer_losses(tiny_mixture, examples, torch.full((1, 3), 1 / 3))
    engine = routed_answer_losses(tiny_mixture, examples, GenerationOptions(route="uniform"))
    for (a, n), (b, m) in zip(one_pass, engine):
        assert n == m and a == pytest.approx(b, abs=1e-4)


def test_eval_loss_scores_every_config_resumes_and_reports_against_the_references(tiny_bundle, tiny_data, tmp_path):
    from loramix.report import write_report

    tasks = ("gsm8k", "bbh_boolean_expressions", "bbh_multistep_arithmetic_two")
    plan = EvalPlan(
        device="cpu", dtype="fp32", out=tmp_path, bundle=tiny_bundle, tasks=tasks, limit=3,
        configs="base,expert:gsm8k,expert:arc,expert:codealpaca,uniform,tla:k=1,route=hidden,prompt,arrow",
        data=tiny_data, embedder_dtype="fp32", generation=False, loss=True,
    )  # fmt: skip
    store = run_answer_losses(plan, progress=False)
    models = {r["model"] for r in store.records.values()}
    assert models == {"base", "gsm8k", "arc", "codealpaca", "uniform", "tla:k=1,route=hidden", "prompt", "arrow"}
    assert len(store.records) == 8 * 3 * 3  # configs x tasks (gsm8k, two BBH) x items
    before = (tmp_path / "answer_loss.jsonl").read_text()
    run_answer_losses(plan, progress=False)
    assert (tmp_path / "answer_loss.jsonl").read_text() == before  # resumed: nothing redone
    results = write_report(tmp_path, {"experts": ["gsm8k", "arc", "codealpaca"], "oracle_experts":
                                      {"gsm8k": "gsm8k", "arc": "arc", "codealpaca": "codealpaca"}})  # fmt: skip
    matrix = results["answer_loss"]
    gsm = matrix["tasks"]["gsm8k"]
    assert gsm["loss"]["oracle"] == gsm["loss"]["gsm8k"]
    best = gsm["hindsight_expert"]
    assert gsm["loss"]["best expert (hindsight)"] == gsm["loss"][best]
    assert best == min(("gsm8k", "arc", "codealpaca"), key=lambda e: gsm["loss"][e]["mean"])
    held_out = matrix["averages"]["held-out"]
    assert held_out["tasks"] == ["bbh_boolean_expressions", "bbh_multistep_arithmetic_two"]
    difference = held_out["vs"]["base"]["uniform"]
    expected = sum(matrix["tasks"][t]["loss"]["uniform"]["mean"] - matrix["tasks"][t]["loss"]["base"]["mean"]
                   for t in held_out["tasks"]) / 2  # fmt: skip
    assert difference["mean"] == pytest.approx(expected) and difference["ci"][0] <= difference["mean"]
    markdown = (tmp_path / "results.md").read_text()
    assert "Average over the held-out tasks" in markdown and "minus best expert (hindsight)" in markdown
    lines = [json.loads(line) for line in before.splitlines()]
    assert all(line["nll"] > 0 and line["tokens"] > 0 for line in lines)
