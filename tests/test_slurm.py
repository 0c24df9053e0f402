"""examples/slurm.sbatch, run as SLURM would run it on one node: the script, `gptrain launch` and the training
are real; `srun` and `scontrol` are small stand-ins first on PATH that record how they were called (srun runs
its task here and passes on the signals it receives, as srun does)."""

import os
import re
import signal
import stat
import sys

import pytest

from gptrain.checkpoint import load_checkpoint
from test_distributed import ENV, ROOT, RUN, Job, free_port, wait_for_records

SRUN = f"""#!{sys.executable}
import os, signal, subprocess, sys
with open(os.environ["SLURM_CALLS"], "a") as calls:
    calls.write("srun " + " ".join(sys.argv[1:]) + "\\n")
task = subprocess.Popen(sys.argv[1:], env={{**os.environ, "SLURM_NODEID": "0"}})  # the one node's task
for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: task.send_signal(signum))
sys.exit(task.wait())
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$SLURM_CALLS"
if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; fi
"""
# this interpreter's gptrain, the checkout under test, whatever else PATH holds
GPTRAIN = f"""#!/bin/bash
exec {sys.executable} -m gptrain.cli "$@"
"""


class Slurm:
    """The example run as job 4242 of one node with 2 CPU processes, with srun and scontrol standing in."""

    def __init__(self, tmp_path, char_data):
        self.tmp_path, self.char_data, self.jobs = tmp_path, char_data, []
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name, text in {"srun": SRUN, "scontrol": SCONTROL, "gptrain": GPTRAIN}.items():
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(stat.S_IRWXU)
        self.env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_CALLS": str(tmp_path / "calls.txt"),
                    "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
                    "SLURM_GPUS_ON_NODE": "2", "MASTER_PORT": str(free_port())}

    def run(self, *args: str) -> Job:
        """The batch script, as sbatch starts it (and starts it again after a requeue)."""
        command = ["bash", str(ROOT / "examples" / "slurm.sbatch"), f"data_dir={self.char_data}",
                   f"out_dir={self.tmp_path / 'out'}", f"log_dir={self.tmp_path / 'logs'}", *RUN, *args]
        self.jobs.append(Job(command, self.tmp_path / f"job{len(self.jobs)}", self.env))
        return self.jobs[-1]

    def calls(self, start: str) -> list[str]:
        """The calls of the stand-ins that start with `start` ("srun", "scontrol requeue"), one line each."""
        return [call for call in (self.tmp_path / "calls.txt").read_text().splitlines() if call.startswith(start)]


@pytest.fixture
def slurm(tmp_path, char_data):
    cluster = Slurm(tmp_path, char_data)
    yield cluster
    for job in cluster.jobs:
        job.kill()


LONG = ["max_iters=300", "lr_decay_iters=300", "eval_interval=100000"]  # seconds of training: time to signal it


def test_a_job_stopped_near_its_time_limit_requeues_itself_and_resumes(slurm, tmp_path):
    job = slurm.run(*LONG)
    wait_for_records(tmp_path, 6)
    job.process.send_signal(signal.SIGUSR1)  # --signal=B:USR1@120: to the batch shell alone
    code, stdout, stderr = job.wait(timeout=120)
    assert code == 0, stdout + stderr
    stopped = load_checkpoint(tmp_path / "out" / "ckpt.pt").progress.step
    assert f"stopped at iter {stopped} on SIGUSR1" in stdout and stopped < 300
    assert slurm.calls("scontrol requeue") == ["scontrol requeue 4242"]

    again = slurm.run(*LONG)  # what SLURM runs after the requeue: the same script, the same arguments
    code, stdout, stderr = again.wait(timeout=300)
    assert code == 0, stdout + stderr
    assert re.search(rf"resuming from {re.escape(str(tmp_path / 'out'))}/ckpt\S*\.pt \(iter {stopped}\)", stdout)
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt").progress.step == 300
    assert len(slurm.calls("scontrol requeue")) == 1  # finished: not again
    assert len(slurm.calls("srun")) == 2


def test_a_job_that_fails_is_not_requeued_and_keeps_its_exit_status(slurm, tmp_path):
    """The stop's checkpoint cannot be written (ckpt.pt is a directory): the run fails after the signal."""
    (tmp_path / "out" / "ckpt.pt").mkdir(parents=True)
    job = slurm.run(*LONG)
    wait_for_records(tmp_path, 6)
    job.process.send_signal(signal.SIGUSR1)
    code, stdout, stderr = job.wait(timeout=120)
    assert code == 1, stdout + stderr  # torchrun's status for a failed worker, through srun
    assert "cannot write the checkpoint" in stderr
    assert not slurm.calls("scontrol requeue")
