"""The command line as a user meets it: JSON output, and one clear line (no traceback) for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args: str, home=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["LORAMIX_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "loramix", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_generate_json(tiny_bundle):
    prompt = "Question: What is 2 + 3?\n\nAnswer:"
    code, out, err = run_in_process("generate", prompt, "--bundle", str(tiny_bundle), "--json", "--max-new-tokens", "6",
                                    "--min-new-tokens", "6", "--every-k", "3")  # fmt: skip
    assert code == 0, err
    payload = json.loads(out)
    assert payload["experts"] == ["gsm8k", "arc", "codealpaca"]
    assert len(payload["token_ids"]) == len(payload["weights"]) == len(payload["tokens"]) == 6
    assert payload["reroutes"] == [0, 3]
    assert all(abs(sum(row) - 1) < 1e-4 for row in payload["weights"])
    assert payload["prompt_token_ids"] and set(payload["timing"]) >= {
        "prefill",
        "decode",
        "routing",
        "tokens_per_second",
    }


def test_generate_trace_streams_and_summarises(tiny_bundle):
    code, out, err = run_in_process("generate", "Write a function.\n\nAnswer:", "--bundle", str(tiny_bundle),
                                    "--trace", "--max-new-tokens", "5", "--min-new-tokens", "5")  # fmt: skip
    assert code == 0, err
    assert "routing weights" in out and "codealpaca" in out and "re-routes" in out


def test_info_json(tmp_path):
    done = run_cli("info", "--json", home=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key in ("version", "cache_dir", "default_bundle", "base_model_path", "embedder_path", "native_kernels"):
        assert key in report
    assert report["cache_dir"] == str(tmp_path)
    assert os.path.isdir(report["embedder_path"])


def run_in_process(*args: str) -> tuple[int, str, str]:
    """`loramix ARGS` in this process (no interpreter start-up): exit code, stdout, stderr."""
    import contextlib
    import io

    from loramix import cli

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["loramix", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as ended:
            cli.main()
    finally:
        sys.argv = argv
    return ended.value.code or 0, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--every-k", "0"], "--every-k must be a positive"),
        (["--route", "magic"], "Unknown route rule"),
        (["--route", "fixed:1,1"], "gives 2 weights"),
        (["--merge", "blend"], "Unknown merge mode"),
        (["--temperature", "nan"], "--temperature must be 0 (greedy) or a positive number"),
        (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    ],
)
def test_bad_generate_options_print_one_clear_error(tiny_bundle, args, message):
    code, _, err = run_in_process("generate", "Hello", "--bundle", str(tiny_bundle), "--max-new-tokens", "2", *args)
    assert code == 2
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args,message",
    [(["--max-batch", "0"], "--max-batch must be at least 1"), (["--route", "oracle:nobody"], "no expert named")],
)
def test_bad_serve_options_are_refused_before_loading(tiny_bundle, args, message):
    code, _, err = run_in_process("serve", "--bundle", str(tiny_bundle), "--port", "1", *args)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_empty_prompt_and_missing_bundle(tiny_bundle, tmp_path):
    code, _, err = run_in_process("generate", "  ", "--bundle", str(tiny_bundle))
    assert code == 2 and "empty" in err and "Traceback" not in err
    code, _, err = run_in_process("generate", "Hi", "--bundle", str(tmp_path / "nowhere"))
    assert code == 2 and "not a bundle" in err and "Traceback" not in err


def test_router_build_rejects_malformed_expert_options(tmp_path):
    code, _, err = run_in_process("router", "build", str(tmp_path / "b"), "--expert", "no-equals-sign")
    assert code == 2 and "NAME=DIR" in err


def test_every_option_field_is_a_command_line_option_with_its_default(monkeypatch):
    """The options dataclasses drive the command line: each field with help is a flag, its default the field's."""
    import dataclasses

    monkeypatch.setenv("COLUMNS", "300")  # no wrapped flag names in the help

    from loramix.bench.harness import BenchOptions
    from loramix.evaluation import EvalPlan
    from loramix.hardware import Placement
    from loramix.loadtest import LoadtestOptions
    from loramix.options import option_fields, options_from_values
    from loramix.ray_serve import RaySettings
    from loramix.sequences import GenerationOptions
    from loramix.server import ServeSettings
    from loramix.specialist import SpecialistPlan
    from loramix.training import TrainConfig

    commands = (
        ("generate", GenerationOptions), ("generate", Placement), ("train", TrainConfig), ("serve", ServeSettings),
        ("serve", RaySettings), ("eval", EvalPlan), ("bench", BenchOptions), ("specialist", SpecialistPlan),
        ("loadtest", LoadtestOptions), ("demo", Placement), ("router", Placement),
    )  # fmt: skip
    for command, cls in commands:
        if command == "router":
            command = "router build"
        code, out, _ = run_in_process(*command.split(), "--help")
        assert code == 0
        for field in option_fields(cls):
            assert field.metadata.get("flag", "--" + field.name.replace("_", "-")) in out, (command, field.name)
    values = {f.name: f.default for f in option_fields(TrainConfig)} | {"target_modules": ["q_proj, k_proj", "o_proj"]}
    config = options_from_values(TrainConfig, values, base=TrainConfig(task="arc"))
    assert config.target_modules == ("q_proj", "k_proj", "o_proj") and config.task == "arc"
    assert dataclasses.replace(config, target_modules=TrainConfig.target_modules) == TrainConfig(task="arc")


def test_generate_takes_the_options_object_and_refuses_unknown_ones(tiny_mixture):
    from loramix.errors import LoramixError
    from loramix.sequences import GenerationOptions

    options = GenerationOptions(max_new_tokens=3, min_new_tokens=3, route="uniform")
    by_object = tiny_mixture.generate("Hi", options)
    by_keyword = tiny_mixture.generate("Hi", max_new_tokens=3, min_new_tokens=3, route="uniform")
    assert by_object.token_ids == by_keyword.token_ids and len(by_object.token_ids) == 3
    with pytest.raises(LoramixError, match="Unknown generation option"):
        tiny_mixture.generate("Hi", max_tokens=3)


def test_a_report_names_a_bundle_inside_the_working_directory_by_a_relative_path(tmp_path, monkeypatch):
    from loramix.paths import shown_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundles" / "mine").mkdir(parents=True)
    assert shown_path(tmp_path / "bundles" / "mine") == os.path.join("bundles", "mine")
    elsewhere = tmp_path.parent / "elsewhere"
    assert shown_path(elsewhere) == str(elsewhere)


def test_every_module_imports_first():
    """Each module imported first, into a fresh set of loramix modules (no circular import hides behind an order)."""
    script = (
        "import importlib, pkgutil, sys, loramix\n"
        "names = [m.name for m in pkgutil.walk_packages(loramix.__path__, 'loramix.')]\n"
        "names.remove('loramix.__main__')  # it runs the command line\n"
        "for name in names:\n"
        "    for key in [k for k in sys.modules if k.startswith('loramix')]:\n"
        "        del sys.modules[key]\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 40


def test_the_commands_page_is_written_from_the_code():
    """docs/commands.md is what scripts/make_docs.py writes from the command line now (re-run it after a change)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("make_docs", root / "scripts" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (root / "docs" / "commands.md").read_text(encoding="utf-8"), "run scripts/make_docs.py"


def test_loadtest_turns_llama_cpps_prompt_cache_off_and_sends_loramix_only_its_own_fields():
    """Every level sends the same prompts: llama.cpp's server would answer the later levels' from its prompt cache,
    work loramix does again, so the llama.cpp dialect asks for it off; loramix is sent nothing it does not know."""
    from loramix.loadtest import LoadtestOptions

    peer = LoadtestOptions(flavour="llama.cpp", route=None)
    assert peer.extra() == {"cache_prompt": False}
    ours = LoadtestOptions(route="fixed:0.5,0.5", every_k=2)
    assert ours.extra() == {"every_k": 2, "route": "fixed:0.5,0.5"}
