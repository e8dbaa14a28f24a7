"""Task data through `datasets` (--data-dir hub): tested on a local mirror of the Hub's four dataset repositories,
in their Hub layouts, built from the tiny data folder; the network is never touched (HF_DATASETS_OFFLINE=1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramix.errors import LoramixError
from loramix.evaluation import EvalPlan, run_evaluation
from loramix.hub import HubData
from loramix.paths import data_dir
from loramix.tasks import TASKS


def _card(configs: dict[str, list[str]]) -> str:
    """A dataset card whose YAML header names each config's split files, as the Hub's cards do."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {name}/{split}-*" for split in splits]
    return "\n".join([*lines, "---", ""])


def _parquet(rows: list[dict], path: Path) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def make_hub_mirror(data: Path, root: Path) -> Path:
    """The tiny data folder's items as the Hub serves them: parquet per config and split, ARC's choices as two lists,
    SQuAD flat (one row per question), CodeAlpaca-20k as one JSON array."""
    gsm = root / "openai" / "gsm8k"
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
        _parquet(rows, gsm / "main" / f"{split}-00000-of-00001.parquet")
    (gsm / "README.md").write_text(_card({"main": ["train", "test"]}))

    arc = root / "allenai" / "ai2_arc"
    for split, name in (("train", "Train"), ("validation", "Dev"), ("test", "Test")):
        source = (data / "arc_challenge" / f"ARC-Challenge-{name}.jsonl").read_text().splitlines()
        rows = []
        for row in map(json.loads, source):
            choices = row["question"]["choices"]
            rows.append({
                "id": row["id"], "question": row["question"]["stem"], "answerKey": row["answerKey"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            })  # fmt: skip
        _parquet(rows, arc / "ARC-Challenge" / f"{split}-00000-of-00001.parquet")
    (arc / "README.md").write_text(_card({"ARC-Challenge": ["train", "validation", "test"]}))

    squad = root / "rajpurkar" / "squad"
    flat = [
        {"id": qa["id"], "title": article["title"], "context": paragraph["context"], "question": qa["question"],
         "answers": {"text": [a["text"] for a in qa["answers"]], "answer_start": [0] * len(qa["answers"])}}
        for article in json.loads((data / "squad_v1.1" / "dev-v1.1.json").read_text())["data"]
        for paragraph in article["paragraphs"] for qa in paragraph["qas"]
    ]  # fmt: skip
    hub_train = [dict(row, id=f"train-{row['id']}", title=f"Train {row['title']}") for row in flat]
    _parquet(hub_train, squad / "plain_text" / "train-00000-of-00001.parquet")
    _parquet(flat, squad / "plain_text" / "validation-00000-of-00001.parquet")
    (squad / "README.md").write_text(_card({"plain_text": ["train", "validation"]}))

    code = root / "sahil2801" / "CodeAlpaca-20k"
    code.mkdir(parents=True)
    rows = json.loads((data / "codealpaca" / "code_alpaca_2k.json").read_text())
    (code / "code_alpaca_20k.json").write_text(json.dumps(rows * 2))  # "20k": twice the 2k file's rows
    return root


@pytest.fixture(scope="module")
def hub_mirror(tiny_data, tmp_path_factory):
    return make_hub_mirror(tiny_data, tmp_path_factory.mktemp("hub-mirror"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "datasets-cache"))


def test_hub_and_folder_give_the_same_examples_where_the_data_is_the_same(tiny_data, hub_mirror):
    hub = data_dir(f"hub:{hub_mirror}")
    assert isinstance(hub, HubData) and hub.mirror == hub_mirror.resolve()
    for task, split in (("gsm8k", "train"), ("gsm8k", "test"), ("arc", "train"), ("arc", "validation"),
                        ("arc", "test"), ("squad", "test"), ("gsm8k", "validation")):  # fmt: skip
        assert TASKS[task].load(hub, split) == TASKS[task].load(tiny_data, split), (task, split)


def test_where_the_hub_has_more_it_is_used_and_named(tiny_data, hub_mirror):
    hub = HubData(hub_mirror)
    squad_train = TASKS["squad"].load(hub, "train")
    assert len(squad_train) == 8 and all(e.id.startswith("squad/train-") for e in squad_train)  # the real train split
    code = {split: TASKS["codealpaca"].load(hub, split) for split in ("train", "test")}
    assert sum(map(len, code.values())) == 40 and all(e.id.startswith("codealpaca20k/") for e in code["test"])
    assert TASKS["squad"].data_name(hub).startswith("hub rajpurkar/squad")
    assert TASKS["squad"].data_name(tiny_data) == TASKS["squad"].offline_data


def test_hub_is_chosen_by_flag_or_environment_and_failures_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAMIX_DATA", "hub")
    assert data_dir() == HubData()
    with pytest.raises(LoramixError, match="does not exist"):
        data_dir(f"hub:{tmp_path / 'nowhere'}")
    with pytest.raises(LoramixError, match="Could not load openai/gsm8k .* point --data-dir"):
        TASKS["gsm8k"].load(HubData(tmp_path), "train")  # an empty mirror: nothing to load, no network tried


def test_results_from_the_hub_are_named_and_never_mixed_with_the_folders(tiny_bundle, tiny_data, hub_mirror, tmp_path):
    out = tmp_path / "eval"
    plan = dict(bundle=tiny_bundle, tasks=("codealpaca",), configs="base", out=out, limit=2, max_new_tokens=2,
                embedder_dtype="fp32")  # fmt: skip
    store = run_evaluation(EvalPlan(**plan, data=f"hub:{hub_mirror}"), progress=False)
    assert {r["data"] for r in store.records.values()} == {"hub sahil2801/CodeAlpaca-20k, 90/10"}
    with pytest.raises(LoramixError, match="data origin"):
        run_evaluation(EvalPlan(**plan, data=tiny_data), progress=False)
