"""`loramix specialist`: gold-answer loss per model and task, checked against PEFT on unpadded sequences."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import loramix.specialist as specialist
from loramix.models import load_base_model
from loramix.report import Scores, answer_loss_matrix, summarise, write_report
from loramix.specialist import SpecialistPlan, answer_losses, encode, run_specialist
from loramix.tasks import TASKS

TASK_NAMES = ("gsm8k", "arc", "codealpaca")  # the tiny bundle has no squad expert
ORACLE = {"gsm8k": "gsm8k", "arc": "arc", "codealpaca": "codealpaca"}


def _reference_losses(model, tokenizer, examples) -> list[float]:
    """Mean answer NLL per example, one unpadded sequence at a time."""
    losses = []
    for example in examples:
        ids, n_answer = encode(tokenizer, example)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        nll = -torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
        losses.append(float(nll[-n_answer:].mean()))
    return losses


@pytest.mark.parametrize("expert", [None, 0, 2])
def test_padded_batch_losses_equal_peft_one_at_a_time(tiny_mixture, tiny_base, tiny_experts, tiny_data, expert):
    examples = TASKS["codealpaca"].load(tiny_data, "train")[:2] + TASKS["gsm8k"].load(tiny_data, "test")[:2]
    lengths = {len(encode(tiny_mixture.tokenizer, e)[0]) for e in examples}
    assert len(lengths) > 1, "the batch must need padding for this test to mean something"
    tiny_mixture.set_merge("exact")
    weights = None if expert is None else torch.eye(3)[expert].unsqueeze(0)
    ours = [nll for nll, _ in answer_losses(tiny_mixture, examples, weights)]

    model, tokenizer = load_base_model(str(tiny_base))
    if expert is not None:
        model = PeftModel.from_pretrained(model, str(tiny_experts[expert]))
    model.eval()
    assert ours == pytest.approx(_reference_losses(model, tokenizer, examples), abs=1e-4)


def test_run_resumes_and_the_report_shows_the_matrix(tiny_bundle, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "specialist"
    plan = SpecialistPlan(bundle=tiny_bundle, tasks=TASK_NAMES, out=out, limit=2, batch_size=2, data=tiny_data,
                          device="cpu", dtype="fp32")  # fmt: skip
    store = run_specialist(plan, progress=False)
    assert len(store.records) == 4 * 3 * 2  # models (base + 3 experts) x tasks x items
    record = json.loads((out / "answer_loss.jsonl").read_text().splitlines()[0])
    assert record["nll"] > 0 and record["tokens"] > 0

    def refuse(*args, **kwargs):
        raise AssertionError("a finished item was scored again")

    monkeypatch.setattr(specialist, "answer_losses", refuse)
    run_specialist(plan, progress=False)

    results = write_report(out, {"experts": list(ORACLE), "oracle_experts": ORACLE, "base_model": "tiny"})
    matrix = results["answer_loss"]
    derived = {"oracle", "best expert (hindsight)"}  # each task's own expert; its best expert, after the fact
    assert matrix["models"][0] == "base" and set(matrix["models"]) == {"base", *ORACLE, *derived}
    assert matrix["tasks"]["arc"]["n"] == 2 and set(matrix["tasks"]["arc"]["vs_base"]) == {*ORACLE, *derived}
    assert matrix["tasks"]["arc"]["loss"]["oracle"] == matrix["tasks"]["arc"]["loss"]["arc"]
    markdown = (out / "results.md").read_text()
    assert "## Gold-answer loss" in markdown and "## Main table" not in markdown
    assert (out / "answer_loss.png").stat().st_size > 0 and "answer_loss.png" in markdown


def test_loss_matrix_pairs_items_and_differences():
    records = [
        {"model": model, "task": "arc", "id": item, "nll": nll}
        for model, losses in (("base", [2.0, 3.0, 4.0]), ("arc", [1.0, 2.5]))
        for item, nll in zip(("a", "b", "c"), losses)
    ]
    matrix = answer_loss_matrix(records)
    cell = matrix["tasks"]["arc"]
    assert cell["n"] == 2, "only the items both models scored"
    assert cell["loss"]["base"]["mean"] == pytest.approx(2.5) and cell["loss"]["arc"]["mean"] == pytest.approx(1.75)
    assert cell["vs_base"]["arc"]["mean"] == pytest.approx(-0.75)


def test_table_cells_use_the_reference_items_and_expert_on_own_task_is_the_oracle():
    def record(config, task, item, value):
        return {"config": config, "task": task, "id": item, "scores": {"accuracy": value, "f1": value}}

    records = [record("base", "arc", i, 0.0) for i in "abcd"] + [record("oracle", "arc", i, 1.0) for i in "ab"]
    records += [record("expert:arc", "squad", i, 0.5) for i in "ab"]
    scores = Scores.from_records(records)
    scores.alias_oracle({"arc": "arc"})
    assert scores.items[("expert:arc", "arc")] == scores.items[("oracle", "arc")]
    assert scores.reference_ids("arc") == ["a", "b", "c", "d"]
    table = summarise(scores)
    assert table["base"]["arc"]["n"] == 4 and not table["base"]["arc"]["partial"]
    partial = table["oracle"]["arc"]
    assert partial["n"] == 2 and partial["partial"] and partial["metrics"]["accuracy"]["mean"] == 1.0
