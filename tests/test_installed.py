"""Run anywhere: a bare copy of the repository with no ../shared beside it, and the wheel installed (not editable)
into a throwaway environment, run from another folder. Both find the shipped bundle and run the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from loramix import native
from loramix.paths import REPO_ROOT

pytestmark = pytest.mark.real


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LORAMIX_DATA", "PYTHONPATH")}
    return env | {"CI": "true", **extra}  # the real-model cache (LORAMIX_HOME) is shared, as the real tests do


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_a_bare_copy_of_the_repository_runs_the_demo(tmp_path):
    """What `git clone` gives a new user: the tracked files, nothing beside them, no task data anywhere."""
    assert REPO_ROOT is not None
    tracked = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    )
    copy = tmp_path / "alone" / "loramix"
    for name in tracked.stdout.decode().split("\0"):
        source = REPO_ROOT / name
        if name and source.is_file() and not source.is_symlink():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes(source.read_bytes())
    assert not (copy.parent / "shared").exists()
    done = _run([sys.executable, "-m", "loramix", "demo"], copy, _environment(PYTHONPATH=str(copy / "src")))
    assert "prompts: the example prompts shipped in the package" in done.stdout
    assert f"bundle: {copy / 'src' / 'loramix' / 'bundles' / 'smollm2-135m'}" in done.stdout.replace("\n", "")
    assert done.stdout.count("reference:") == 4


def test_the_wheel_installed_elsewhere_finds_its_bundle_and_generates(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(REPO_ROOT)], tmp_path, _environment())  # fmt: skip
    (wheel,) = wheels.glob("loramix-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, _environment())
    python = venv / "bin" / "python"
    target = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                       _environment()).stdout.strip())  # fmt: skip
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
         tmp_path, _environment())  # fmt: skip
    # The dependencies come from this environment's site-packages, added after the wheel's own folder; its .pth
    # files (the editable install of this checkout among them) are not run, so `loramix` is the wheel's.
    (target / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    info = json.loads(_run([str(python), "-m", "loramix", "info", "--json"], elsewhere, _environment()).stdout)
    assert info["default_bundle"] == str(target / "loramix" / "bundles" / "smollm2-135m")
    assert Path(info["default_bundle"], "router_hidden.safetensors").is_file()
    if native.library() is not None:  # the wheel ships the native kernels' source: they build from it too
        assert info["native_kernels"].startswith("in use") and "/native/native-" in info["native_kernels"]
    where = _run([str(python), "-c", "import loramix; print(loramix.__file__)"], elsewhere, _environment())
    assert where.stdout.strip().startswith(str(target))
    generated = _run([str(python), "-m", "loramix", "generate", "Question: What is 2 + 3?\n\nAnswer:",
                      "--max-new-tokens", "6", "--json"], elsewhere, _environment())  # fmt: skip
    result = json.loads(generated.stdout)
    assert result["text"] and len(result["weights"]) == len(result["token_ids"]) and result["reroutes"][:2] == [0, 1]
    # (the demo itself runs from the bare copy above; here the installed package's own files are what is tested)
