"""Bring your own adapters and texts: a bundle from adapters made by PEFT directly plus files of example prompts,
edited one expert at a time (add / remove / list), through the library and the command line (in-process)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from helpers import make_random_expert
from loramix.bundle import ROUTER_FILE, Bundle
from loramix.bundle_build import add_expert, build_bundle, describe_experts, remove_expert
from loramix.centroids import load_centroids
from loramix.cli import app
from loramix.errors import LoramixError
from loramix.generation import MixtureModel
from loramix.hidden_router import HIDDEN_ROUTER_FILE
from loramix.router_texts import read_text_file

POEMS = [
    "Write a sonnet about the autumn moon.",
    "Compose a haiku about rain on a tin roof.",
    "Write a short poem about the sea at night, with rhymes.",
    "A limerick about a cat who sails to Spain.",
]
SQL = [
    "Write an SQL query that counts the orders per customer.",
    "SELECT the ten newest rows from the users table.",
    "Join the invoices and payments tables on invoice_id in SQL.",
]
LAW = ["Summarise the tenant's rights under this lease clause.", "Is a verbal contract binding? Explain."]


@pytest.fixture(scope="module")
def own_adapters(tiny_base, tmp_path_factory):
    """Three PEFT adapters made by PEFT itself (no loramix metadata), each with another rank, alpha or targets."""
    root = tmp_path_factory.mktemp("own")
    return {
        "poems": make_random_expert(tiny_base, root / "poems", seed=21, rank=4, alpha=8.0),
        "sql": make_random_expert(tiny_base, root / "sql", seed=22, rank=8, alpha=4.0, targets=("q_proj", "o_proj")),
        "law": make_random_expert(tiny_base, root / "law", seed=23, rank=2, alpha=2.0, use_rslora=True),
    }


@pytest.fixture(scope="module")
def own_texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    poems = root / "poems.jsonl"
    poems.write_text("\n".join(json.dumps({"text": t}) for t in POEMS) + "\n", encoding="utf-8")
    sql = root / "sql.csv"
    sql.write_text("id,prompt\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(SQL)), encoding="utf-8")
    law = root / "law.txt"
    law.write_text("\n".join(LAW) + "\n\n", encoding="utf-8")
    return {"poems": poems, "sql": sql, "law": law}


@pytest.fixture(scope="module")
def own_bundle(tiny_base, own_adapters, own_texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("own-bundle") / "bundle"
    experts = {name: own_adapters[name] for name in ("poems", "sql")}
    texts = {name: str(own_texts[name]) for name in ("poems", "sql")}
    build_bundle(root, experts, base_model=str(tiny_base), texts=texts)
    return root


def test_a_bundle_from_peft_adapters_and_text_files_routes_and_generates(own_bundle):
    bundle = Bundle.load(own_bundle)
    assert bundle.expert_names == ["poems", "sql"]
    assert [e.texts for e in bundle.experts] == ["texts/poems.jsonl", "texts/sql.csv"]  # copied in: self-contained
    assert all(e.task is None for e in bundle.experts)
    assert (own_bundle / HIDDEN_ROUTER_FILE).is_file() and bundle.info["router_examples"] == {"poems": 4, "sql": 3}
    mixture = MixtureModel.from_bundle(own_bundle, embedder_dtype="fp32")
    sims = mixture.router.similarities(["Write a poem about snow.", "An SQL query for the average salary."])
    assert sims.similarities.argmax(dim=1).tolist() == [0, 1]  # each text goes to the expert its file describes
    for route in ("hidden", "paper", "top1"):
        results = mixture.generate(["Write a poem about snow.", "SELECT"], route=route, max_new_tokens=6)
        for result in results:
            assert result.token_ids and result.reroutes[0] == 0
            assert torch.allclose(result.weights.sum(dim=1), torch.ones(len(result.token_ids)))


def test_an_expert_without_texts_or_task_is_refused_with_the_flag_to_use(tiny_base, own_adapters, tmp_path):
    with pytest.raises(LoramixError, match="--texts poems=FILE"):
        build_bundle(tmp_path / "b", {"poems": own_adapters["poems"]}, base_model=str(tiny_base))
    with pytest.raises(LoramixError, match="no --expert is called"):
        build_bundle(tmp_path / "b", {"poems": own_adapters["poems"]}, base_model=str(tiny_base), texts={"x": "gsm8k"})
    with pytest.raises(LoramixError, match="neither a task"):
        build_bundle(tmp_path / "b", {"p": own_adapters["poems"]}, base_model=str(tiny_base), texts={"p": "nope.md"})
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_an_adapter_that_is_neither_a_folder_nor_reachable_on_the_hub_says_so(tiny_base, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network in tests
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LoramixError, match="'someone/no-such-lora' is not a local folder, and fetching it"):
        build_bundle(tmp_path / "b", {"x": "someone/no-such-lora"}, base_model=str(tiny_base), texts={"x": "gsm8k"})


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.md", "hello", "must be a .txt, .jsonl, .csv file"),
        ("a.txt", "\n \n", "holds no texts"),
        ("a.jsonl", '{"text": "ok"}\n{oops\n', "a.jsonl:2 is not valid JSON"),
        ("a.jsonl", '{"question": "no text field"}\n', 'a "text" or "prompt" field'),
        ("a.csv", "question,answer\nq,a\n", "no 'text' or 'prompt' column"),
    ],
)
def test_bad_text_files_are_refused_with_the_fix(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LoramixError, match=message):
        read_text_file(path)


def test_text_files_accept_bare_strings_and_both_field_names(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('"a bare string"\n{"prompt": "a prompt"}\n\n{"text": "a text", "prompt": "ignored"}\n')
    assert read_text_file(path) == ["a bare string", "a prompt", "a text"]


def test_adding_and_removing_an_expert_keeps_the_others_rows(tiny_base, own_bundle, own_adapters, own_texts, tmp_path):
    root = tmp_path / "edited"
    import shutil

    shutil.copytree(own_bundle, root)
    names = ["poems", "sql"]
    text_rows = load_centroids(root / ROUTER_FILE, 2)
    hidden_rows = load_centroids(root / HIDDEN_ROUTER_FILE, len(names), rank=3)

    add_expert(root, "law", own_adapters["law"], str(own_texts["law"]))
    added = Bundle.load(root)
    assert added.expert_names == ["poems", "sql", "law"] and (root / "texts" / "law.txt").is_file()
    assert torch.equal(load_centroids(root / ROUTER_FILE, 3)[:2], text_rows)
    assert torch.equal(load_centroids(root / HIDDEN_ROUTER_FILE, len(added.expert_names), rank=3)[:, :2], hidden_rows)
    rebuilt = tmp_path / "rebuilt"  # the new rows equal what building all three at once gives
    build_bundle(rebuilt, {**{n: own_adapters[n] for n in names}, "law": own_adapters["law"]},
                 base_model=str(tiny_base), texts={n: str(own_texts[n]) for n in own_texts})  # fmt: skip
    assert torch.allclose(load_centroids(rebuilt / ROUTER_FILE, 3), load_centroids(root / ROUTER_FILE, 3), atol=1e-5)
    both = [load_centroids(r / HIDDEN_ROUTER_FILE, len(added.expert_names), rank=3) for r in (rebuilt, root)]
    assert torch.allclose(*both, atol=1e-5)
    rows = {row["name"]: row for row in describe_experts(root)}
    assert (rows["sql"]["rank"], rows["sql"]["targets"], rows["law"]["texts"]) == (8, "o_proj,q_proj", "texts/law.txt")
    assert rows["law"]["scaling"] == pytest.approx(2.0 / 2**0.5, abs=1e-4)  # rsLoRA
    mixture = MixtureModel.from_bundle(root, embedder_dtype="fp32")
    assert len(mixture.generate("Is this lease fair?", route="oracle:law", max_new_tokens=4).token_ids) > 0

    remove_expert(root, "sql")
    kept = Bundle.load(root)
    assert kept.expert_names == ["poems", "law"] and not (root / "experts" / "sql").exists()
    assert torch.equal(load_centroids(root / ROUTER_FILE, 2)[0], text_rows[0])
    with pytest.raises(LoramixError, match="already has an expert 'poems'"):
        add_expert(root, "poems", own_adapters["poems"], str(own_texts["poems"]))
    with pytest.raises(LoramixError, match="no expert 'sql'"):
        remove_expert(root, "sql")
    remove_expert(root, "law")
    with pytest.raises(LoramixError, match="only expert"):
        remove_expert(root, "poems")


def test_the_commands_a_user_types(tiny_base, own_adapters, own_texts, tmp_path):
    """router build --expert NAME=DIR --texts NAME=FILE, bundle add, bundle list --json, bundle remove; in-process."""
    runner = CliRunner()
    root = tmp_path / "cli-bundle"
    built = runner.invoke(app, [
        "router", "build", str(root), "--base", str(tiny_base),
        "--expert", f"poems={own_adapters['poems']}", "--texts", f"poems={own_texts['poems']}",
        "--expert", f"sql={own_adapters['sql']}", "--texts", f"sql={own_texts['sql']}",
    ])  # fmt: skip
    assert built.exit_code == 0, built.output
    assert "experts poems, sql" in built.output
    added = runner.invoke(app, ["bundle", "add", str(root), "--expert", f"law={own_adapters['law']}",
                                "--texts", str(own_texts["law"])])  # fmt: skip
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["bundle", "list", str(root), "--json"])
    assert [row["name"] for row in json.loads(listed.output)] == ["poems", "sql", "law"]
    table = runner.invoke(app, ["bundle", "list", str(root)])
    assert table.exit_code == 0 and all(name in table.output for name in ("poems", "sql", "law", "rank"))
    assert runner.invoke(app, ["bundle", "remove", str(root), "sql"]).exit_code == 0
    bad = runner.invoke(app, ["router", "build", str(tmp_path / "x"), "--expert", "oops"])
    assert isinstance(bad.exception, LoramixError) and "--expert takes NAME=DIR" in str(bad.exception)
