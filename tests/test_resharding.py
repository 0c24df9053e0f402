"""FSDP resumes from its own DCP shards on any world size: a run stopped on 2 processes goes on as FSDP on
1, 2 or 3 (and a DDP run as FSDP on 3), and ends as the run never stopped did. Driven through the command
(train.py under torchrun) alone, so that it guards the checkpoint whatever the code inside is renamed to."""

import shutil
from pathlib import Path

import pytest

from test_distributed import MUON, args_for, assert_same_run, run_ok, torchrun

STOP, END = 3, 6  # stopped at step 3 of 6
# 12 sequences a step in micro-batches of 2, which 1, 2 and 3 processes share evenly: each micro-batch, and so
# its dropout masks (drawn per micro-batch), is the same on every world size. The schedule ends at
# lr_decay_iters, so a run stopped early takes the same learning rates.
SETTINGS = ["tokens_per_step=384", "batch_size=2", f"max_iters={END}", f"lr_decay_iters={END}"]
OPTIMIZER = {"adamw": [], "muon": MUON}  # Muon in float32: its step the same on any number of shards


def launch(run_dir: Path, char_data: Path, parallelism: str, processes: int, *extra: str) -> None:
    run_ok(torchrun("--standalone", f"--nproc_per_node={processes}",
                    args=args_for(run_dir, char_data, f"parallelism={parallelism}", *SETTINGS, *extra)))


@pytest.fixture(scope="module")
def uninterrupted(char_data, tmp_path_factory):
    """The reference of each optimizer, made once: the whole run as FSDP on 2 processes, as the stopped FSDP
    runs began (with AdamW, the same run as on one process: test_distributed)."""
    made = {}

    def get(optimizer: str) -> Path:
        if optimizer not in made:
            made[optimizer] = tmp_path_factory.mktemp(f"uninterrupted_{optimizer}")
            launch(made[optimizer], char_data, "fsdp", 2, *OPTIMIZER[optimizer])
        return made[optimizer]

    return get


@pytest.fixture(scope="module")
def stopped(char_data, tmp_path_factory):
    """A run on 2 processes stopped at STOP, made once for each optimizer and layout; each resume goes on
    from a copy of its out_dir."""
    made = {}

    def get(optimizer: str, parallelism: str) -> Path:
        if (optimizer, parallelism) not in made:
            run_dir = made[optimizer, parallelism] = tmp_path_factory.mktemp(f"stopped_{optimizer}_{parallelism}")
            launch(run_dir, char_data, parallelism, 2, f"max_iters={STOP}", *OPTIMIZER[optimizer])
        return made[optimizer, parallelism]

    return get


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("saved_by, processes", [("fsdp", 2), ("fsdp", 1), ("fsdp", 3), ("ddp", 3)],
                         ids=["fsdp2-fsdp2", "fsdp2-fsdp1", "fsdp2-fsdp3", "ddp2-fsdp3"])
def test_a_run_stopped_on_2_processes_resumes_as_fsdp_on_any_number(saved_by, processes, optimizer, uninterrupted,
                                                                    stopped, char_data, tmp_path):
    """Every step's train and val loss, and the final weights, as the uninterrupted run's: the shards of 2
    ranks (or DDP's full file) loaded into 1, 2 or 3, the AdamW moments and Muon's momentum with them."""
    shutil.copytree(stopped(optimizer, saved_by) / "out", tmp_path / "out")
    launch(tmp_path, char_data, "fsdp", processes, "init_from=resume", *OPTIMIZER[optimizer])
    assert_same_run(tmp_path, uninterrupted(optimizer), 1e-5, 1e-5)
