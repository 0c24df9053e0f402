"""Checkpoints written by an earlier gptrain (tests/fixtures/, frozen by make_fixtures.py) still resume where
they stopped, fine-tune and generate as they did then: a one-process file, and an FSDP run's file with the
DCP shards of its 2 ranks. Through the commands alone, since what is inside them will change."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_distributed import ENV, ROOT, by_step, records, run_ok, torchrun

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PLAIN = [sys.executable, "train.py"]
FSDP_ON_2 = torchrun("--standalone", "--nproc_per_node=2", args=["parallelism=fsdp"])


def fixture(name: str) -> tuple[Path, dict]:
    """The fixture's checkpoint, and what its making recorded."""
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    return FIXTURES / name / f"ckpt-{expected['step']:06d}.pt", expected


def train_args(expected: dict, char_data: Path, out: Path, *extra: str) -> list[str]:
    return [*expected["args"], f"data_dir={char_data}", f"out_dir={out}", f"log_dir={out.parent / 'logs'}", *extra]


def logged(out: Path) -> dict[str, dict[int, float]]:
    history = records(out.parent)
    return {key: by_step(history, key) for key in ("train/loss", "val/loss")}


@pytest.mark.parametrize("name, launcher", [("one_process", PLAIN), ("fsdp2", PLAIN), ("fsdp2", FSDP_ON_2)],
                         ids=["one_process", "fsdp2-into-one-process", "fsdp2-into-fsdp2"])
def test_an_old_checkpoint_resumes_where_it_stopped(name, launcher, char_data, tmp_path):
    """The steps after it log the losses they logged in the run it was saved from."""
    checkpoint, expected = fixture(name)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(checkpoint, out)
    if (shards := checkpoint.with_suffix(".dcp")).is_dir():
        shutil.copytree(shards, out / shards.name)
    step = expected["step"]
    run_ok([*launcher, *train_args(expected, char_data, out, "init_from=resume", f"max_iters={step + 2}")])
    want = {key: {int(s): v for s, v in losses.items()} for key, losses in expected.items() if "/loss" in key}
    want["val/loss"].pop(step)  # the checkpoint's own evaluation: resuming does not repeat it
    assert logged(out) == {key: pytest.approx(losses, abs=1e-5) for key, losses in want.items()}


@pytest.mark.parametrize("name", ["one_process", "fsdp2"])
def test_an_old_checkpoint_fine_tunes_from_step_0(name, char_data, tmp_path):
    """Its weights, evaluated before the first step, give the val loss of the run that saved them."""
    checkpoint, expected = fixture(name)
    out = tmp_path / "out"
    run_ok([*PLAIN, *train_args(expected, char_data, out, f"init_from={checkpoint}", "max_iters=1")])
    losses = logged(out)
    assert list(losses["train/loss"]) == [0] and list(losses["val/loss"]) == [0, 1]
    assert losses["val/loss"][0] == pytest.approx(expected["val/loss"][str(expected["step"])], abs=1e-5)


@pytest.mark.parametrize("name", ["one_process", "fsdp2"])
def test_an_old_checkpoint_generates_the_text_it_did(name):
    checkpoint, expected = fixture(name)
    result = subprocess.run([sys.executable, "generate.py", "--model_path", str(checkpoint), *expected["generate"]],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stdout) == (0, expected["sample"]), result.stderr[-2000:]
