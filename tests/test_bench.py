"""bench/gpu_check.sh without a GPU: its dry run lists every step, and each step's command names files that
exist, flags its script takes and settings training accepts, so that a renamed script, a dropped flag or
a misspelled key fails here rather than minutes into a GPU session."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gptrain.config import load_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["deps", "cuda_tests", "data", "gpt2_124m", "recipes", "fsdp", "fsdp_resume", "batch_auto", "generate", "serve"]


def dry_run(*args: str) -> dict[str, list[str]]:
    """Each step's command, by step name, in the order the script would run them."""
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry_run", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    steps = {}
    for line in done.stdout.splitlines():
        match = re.fullmatch(r"step (\w+) \(limit \d+s\): (.*)", line.strip())
        assert match, f"not a step line: {line!r}"
        steps[match[1]] = shlex.split(match[2])
    return steps


def test_the_dry_run_lists_every_step_once_and_runs_nothing(tmp_path):
    steps = dry_run("--nanogpt", str(tmp_path / "nanoGPT"), "--out", str(tmp_path / "out"))
    assert list(steps) == STEPS
    assert not (tmp_path / "out").exists()
    assert steps["gpt2_124m"][-2:] == ["--nanogpt", str(tmp_path / "nanoGPT")]


def test_only_runs_the_steps_named_and_the_data_they_train_on():
    assert list(dry_run("--only", "serve,fsdp")) == ["data", "fsdp", "serve"]
    assert list(dry_run("--only", "cuda_tests")) == ["cuda_tests"]


def help_text(command: list[str]) -> str:
    """`command --help`, skipping the test where the script needs a package this environment lacks."""
    done = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    missing = re.search(r"No module named '([\w.]+)'", done.stderr)
    if done.returncode and missing:
        pytest.skip(f"{shlex.join(command)} needs {missing[1]}")
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("name", STEPS)
def test_each_step_names_what_exists_with_flags_and_settings_it_takes(name, tmp_path):
    python, *args = dry_run("--nanogpt", str(tmp_path), "--out", str(tmp_path / "out"))[name]
    assert python == sys.executable
    if args[0] == "-c":
        compile(args[1], name, "exec")
        return
    if args[:2] == ["-m", "pytest"]:
        tests = [arg for arg in args[2:] if not arg.startswith("-") and arg != "no:cacheprovider"]
        assert tests and all((ROOT / test).is_file() for test in tests)
        return
    if args[:2] == ["-m", "torch.distributed.run"]:
        args = [arg for arg in args[2:] if not arg.startswith("--")]  # torchrun's own options
    if args[0] == "train.py":
        load_config(args[1:])  # raises on an unknown key or a bad value
        return
    command = [python, *args[:3]] if args[0] == "-m" else [python, args[0]]  # -m gptrain.cli prepare
    assert args[0] == "-m" or (ROOT / args[0]).is_file()
    accepted = help_text(command)
    for flag in (arg.split("=")[0] for arg in args[len(command) - 1:] if arg.startswith("--")):
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", accepted), f"{shlex.join(command)} takes no {flag}"
