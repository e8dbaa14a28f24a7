"""Task loading: the paper's templates, label normalisation, fixed and disjoint splits."""

from __future__ import annotations

import pytest

from loramix.errors import LoramixError
from loramix.paths import data_dir
from loramix.tasks import TASKS, Example, get_task
from loramix.tasks.arc import normalise_label


def _real_data():
    try:
        return data_dir()
    except LoramixError:
        pytest.skip("the shared task data (../shared/data or $LORAMIX_DATA) is not available")


def test_templates_on_tiny_data(tiny_data):
    gsm = get_task("gsm8k").load(tiny_data, "train")[1]
    assert gsm.prompt == "Question: Tom has 1 apples and buys 2 more. How many?\n\nAnswer:"
    assert gsm.training_text == gsm.prompt + " 1+2=3\n#### 3" and gsm.references == ("3",)
    arc = get_task("arc").load(tiny_data, "test")[0]
    assert arc.prompt == "Question: Which is a planet 0?\nChoices: A. Mars\nB. Moon\n\nAnswer:"
    assert arc.target == "A" and arc.choices == ("A", "B")
    squad = get_task("squad").load(tiny_data, "test")[0]
    assert squad.prompt == "Context:\nArticle 3 says the sky is blue.\n\nQuestion: What colour?\n\nAnswer:"
    code = {
        e.id: e
        for e in get_task("codealpaca").load(tiny_data, "train") + get_task("codealpaca").load(tiny_data, "test")
    }
    assert code["codealpaca/1"].prompt == "Write code number 1.\nInput: x = 1\n\nAnswer:"
    assert code["codealpaca/2"].prompt == "Write code number 2.\n\nAnswer:"


@pytest.mark.parametrize("label,expected", [("1", "A"), ("4", "D"), ("5", "E"), ("B", "B"), (" c ", "C")])
def test_arc_labels_are_normalised(label, expected):
    assert normalise_label(label) == expected


def test_unknown_task_and_split(tiny_data):
    with pytest.raises(LoramixError, match="Unknown task"):
        get_task("poetry")
    with pytest.raises(LoramixError, match="no split 'dev'"):
        get_task("gsm8k").load(tiny_data, "dev")


def test_missing_data_names_the_fix(tmp_path):
    with pytest.raises(LoramixError, match="--data-dir"):
        get_task("gsm8k").load(tmp_path, "train")


def test_data_dir_override_must_exist(tmp_path, monkeypatch):
    with pytest.raises(LoramixError, match="does not exist"):
        data_dir(tmp_path / "missing")
    monkeypatch.setenv("LORAMIX_DATA", str(tmp_path))
    assert data_dir() == tmp_path.resolve()


def test_real_split_sizes_and_disjointness():
    root = _real_data()
    sizes = {(name, split): len(task.load(root, split)) for name, task in TASKS.items() for split in ("train", "test")}
    assert sizes[("gsm8k", "train")] == 7473 and sizes[("gsm8k", "test")] == 1319
    assert sizes[("arc", "train")] == 1119 and sizes[("arc", "test")] == 1172
    assert sizes[("squad", "train")] + sizes[("squad", "test")] == 10570
    assert sizes[("codealpaca", "train")] == 1815 and sizes[("codealpaca", "test")] == 202
    for name in ("squad", "codealpaca"):
        train = {e.id for e in TASKS[name].load(root, "train")}
        test = {e.id for e in TASKS[name].load(root, "test")}
        assert not train & test
    # SQuAD is split by article: no context appears on both sides
    contexts = {
        split: {e.prompt.split("\n\nQuestion:")[0] for e in TASKS["squad"].load(root, split)}
        for split in ("train", "test")
    }
    assert not contexts["train"] & contexts["test"]


def test_real_arc_answers_are_letters_among_the_choices():
    root = _real_data()
    for split in ("train", "test"):
        for example in TASKS["arc"].load(root, split):
            assert example.target in example.choices
            assert all(label in "ABCDE" for label in example.choices)


def test_real_gsm8k_references_are_the_final_numbers():
    root = _real_data()
    example = TASKS["gsm8k"].load(root, "test")[0]
    assert example.references == (example.target.split("####")[-1].strip(),)
    assert example.references[0] == "18"


def test_validation_is_held_out_of_what_experts_train_on_and_of_test():
    from loramix.tasks.base import VALIDATION_SIZE, held_out_of_train
    from loramix.training import select_examples

    train = [Example(id=f"t{i}", prompt=f"p{i}", target="x") for i in range(1000)]
    validation = held_out_of_train(train)
    assert len(validation) == VALIDATION_SIZE
    trained = select_examples(train, len(train) - VALIDATION_SIZE, seed=0)
    assert not {e.id for e in validation} & {e.id for e in trained}
    assert held_out_of_train(train) == validation, "fixed, not drawn anew"


def test_every_task_has_a_validation_split(tiny_data):
    for name, task in TASKS.items():
        assert task.load(tiny_data, "validation"), name


def test_the_demo_runs_without_any_data_folder(tmp_path, monkeypatch):
    """A bare clone has no ../shared/data: the demo falls back to the prompts shipped in the package."""
    from loramix import paths
    from loramix.demo import demo_examples

    monkeypatch.delenv("LORAMIX_DATA", raising=False)
    monkeypatch.setattr(paths, "_default_data_candidates", lambda: [tmp_path / "nowhere"])
    examples, origin = demo_examples()
    assert [task.name for task, _ in examples] == list(TASKS)
    assert all(example.prompt.rstrip().endswith("Answer:") and example.target for _, example in examples)
    assert "shipped" in origin
    with pytest.raises(LoramixError, match="does not exist"):
        demo_examples(tmp_path / "typo")  # a folder the user named must exist


def test_every_task_owns_its_scoring_and_primary_metric():
    """What the evaluation needs of a task comes from the task: its scorer, the metric it is ranked by, the answer
    letters (ARC) whose first-token likelihood picks an answer too."""
    for task in TASKS.values():
        example = Example(id="x", prompt="p", target="42", references=("42",), choices=("A", "B"))
        scores = task.score("42", example)
        assert task.primary_metric in scores and all(0.0 <= v <= 1.0 for v in scores.values()), task.name
    assert TASKS["arc"].answer_letters == ("A", "B", "C", "D", "E")
    assert [t.name for t in TASKS.values() if t.answer_letters] == ["arc"]
    assert TASKS["arc"].score("B) carbon dioxide", Example("x", "p", "B", ("B",), ("A", "B"))) == {"accuracy": 1.0}
    assert TASKS["gsm8k"].score("so 18.", Example("x", "p", "18", ("18",)))["flexible"] == 1.0
