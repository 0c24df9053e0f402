"""Real multi-process runs on the CPU with gloo: the same model on any number of processes, DDP or FSDP,
resharding checkpoints, multi-node, preemption and hung ranks."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptrain.checkpoint import load_checkpoint, load_model
from gptrain.config import load_config
from gptrain.distributed import DistInfo, lost_rank
from gptrain.model import GPT
from gptrain.train import train

from conftest import run_two_ranks

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# 2 global micro-batches a step, 3 eval batches (uneven over 2 ranks), dropout on: the run must not
# depend on how many processes share it.
RUN = ["n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "tokens_per_step=256",
       "learning_rate=3e-3", "min_lr=3e-4", "warmup_iters=2", "max_iters=6", "lr_decay_iters=6", "eval_interval=3",
       "eval_iters=3", "log_interval=1", "dropout=0.1", "device=cpu", "dtype=float32", "compile=false",
       "tensorboard=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*launcher: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "train.py", *args]


def run_ok(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]


class Job:
    """A command run in the background. Its output goes to files: a pipe that nobody reads while the test
    waits can fill up and stall the run."""

    def __init__(self, cmd: list[str], log: Path, env: dict):
        self.stdout, self.stderr = log.with_suffix(".out"), log.with_suffix(".err")
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            # in a session of its own, whose process group a test can signal as a terminal's Ctrl-C would
            self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)

    def ctrl_c(self) -> None:
        """SIGINT to its whole process group, as a terminal sends it to its foreground job."""
        os.killpg(self.process.pid, signal.SIGINT)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        """Exit code, stdout and stderr once it has ended."""
        code = self.process.wait(timeout=timeout)
        return code, self.stdout.read_text(), self.stderr.read_text()

    def kill(self) -> None:
        """It and everything it started (torchrun's workers run in sessions of their own)."""
        def tree(pid: int) -> list[int]:
            children = [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]
            return [pid] + [p for child in children for p in tree(child)]

        for pid in tree(self.process.pid) if self.process.poll() is None else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()


@pytest.fixture
def background(tmp_path):
    """Start jobs with background(cmd); whatever the test does, none outlives it."""
    jobs = []

    def start(cmd: list[str], env: dict = ENV) -> Job:
        jobs.append(Job(cmd, tmp_path / f"job{len(jobs)}", env))
        return jobs[-1]

    yield start
    for job in jobs:
        job.kill()


def wait_for_records(run_dir: Path, count: int, timeout: float = 120) -> None:
    """Until a run in the background has logged `count` records (so it is mid-training)."""
    metrics, deadline = run_dir / "out" / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= count):
        assert time.monotonic() < deadline, f"{metrics} did not reach {count} records"
        time.sleep(0.2)


def by_step(history: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in history if key in r}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final weights as one process sees them, whatever layout wrote them (a file or DCP shards)."""
    path = run_dir / "out" / "ckpt.pt"
    model, _ = load_model(path, device=torch.device("cpu"))
    return model.state_dict()


def train_in_process(args: list[str]) -> list[dict]:
    return train(load_config(args))


def args_for(run_dir: Path, char_data: Path, *extra: str) -> list[str]:
    return [f"data_dir={char_data}", f"out_dir={run_dir / 'out'}", f"log_dir={run_dir / 'logs'}", *RUN, *extra]


@pytest.fixture(scope="module")
def one_process(char_data, tmp_path_factory) -> Path:
    """The reference: the same run on a single process, no torchrun."""
    run_dir = tmp_path_factory.mktemp("one_process")
    train_in_process(args_for(run_dir, char_data))
    return run_dir


def assert_same_run(run_dir: Path, reference: Path, loss_tol: float = 1e-5, weight_tol: float = 1e-5) -> None:
    """Per-step train and val losses, and the final weights, within 1e-5 of the reference run's."""
    got, want = records(run_dir), records(reference)
    for key in ("train/loss", "val/loss"):
        assert by_step(got, key) == pytest.approx(by_step(want, key), abs=loss_tol), key
    reference_weights = weights(reference)
    for name, tensor in weights(run_dir).items():
        torch.testing.assert_close(tensor, reference_weights[name], atol=weight_tol, rtol=0, msg=name)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_train_the_same_model_as_one(parallelism, one_process, char_data, tmp_path):
    result = run_ok(torchrun("--standalone", "--nproc_per_node=2",
                             args=args_for(tmp_path, char_data, f"parallelism={parallelism}")))
    assert f"2 process(es), {parallelism}" in result.stdout
    assert "256 tokens per step" in result.stdout  # 4 x 32 x 2, as on one process
    assert_same_run(tmp_path, one_process)
    if parallelism == "fsdp":  # one shard file per rank beside the run state
        assert sorted(p.name for p in (tmp_path / "out" / "ckpt-000006.dcp").glob("*.distcp")) == [
            "__0_0.distcp", "__1_0.distcp"]


# Newton-Schulz in float32 on any machine (auto would take bfloat16 where it is native, float32 elsewhere)
MUON = ["optimizer=muon", "muon_dtype=float32", "pos_emb=rope", "norm=rmsnorm", "qk_norm=true", "mlp=swiglu",
        "tie_embeddings=false"]


@pytest.fixture(scope="module")
def one_process_muon(char_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_process_muon")
    train_in_process(args_for(run_dir, char_data, *MUON))
    return run_dir


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_muon_on_two_processes_trains_the_model_of_one(parallelism, one_process_muon, char_data, tmp_path):
    """DDP reduces the gradients before Muon sees them: the same run to the bit. Under FSDP each rank holds
    rows of each matrix; Muon gathers the whole update, orthogonalises it and keeps its rows, so only the
    gradients' summation order differs: measured within 1.2e-7 on the weights and 3.2e-7 on the losses
    (one float32 rounding of a loss near 4) over three seeds. Orthogonalising each rank's rows apart is
    3e-2 off on the weights; iterating in bfloat16, where a summation order can flip a rounding, 6e-4."""
    run_ok(torchrun("--standalone", "--nproc_per_node=2",
                    args=args_for(tmp_path, char_data, f"parallelism={parallelism}", *MUON)))
    assert_same_run(tmp_path, one_process_muon, loss_tol=1e-6, weight_tol=1e-6)


def test_tokens_per_step_gives_the_same_run_when_the_micro_batch_shrinks(char_data, tmp_path):
    """batch_size 8 on one process takes the step's 8 sequences at once; two processes take 4 each."""
    train_in_process(args_for(tmp_path / "one", char_data, "batch_size=8", "dropout=0"))
    result = run_ok(torchrun("--standalone", "--nproc_per_node=2",
                             args=args_for(tmp_path / "two", char_data, "batch_size=8", "dropout=0")))
    assert "256 tokens per step = 2 micro-batches of 4 x 32: 1 on each of 2 process(es)" in result.stdout
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_generate_and_fine_tuning_read_an_fsdp_checkpoint_directly(char_data, tmp_path):
    run_ok(torchrun("--standalone", "--nproc_per_node=2", args=args_for(tmp_path, char_data, "parallelism=fsdp")))
    checkpoint = tmp_path / "out" / "ckpt.pt"
    sample = run_ok([sys.executable, "generate.py", "--model_path", str(checkpoint), "--prompt", "ROMEO:",
                     "--max_new_tokens", "20", "--temperature", "0"])
    assert len(sample.stdout.removesuffix("\n")) == 20 and sample.stderr == ""  # 20 characters, greedy
    finetuned = train_in_process(args_for(tmp_path / "ft", char_data, f"init_from={checkpoint}", "max_iters=1",
                                          "eval_interval=1"))
    assert by_step(finetuned, "val/loss")[0] == pytest.approx(by_step(records(tmp_path), "val/loss")[6], abs=1e-5)


def test_two_nodes_on_localhost_train_the_same_model_as_one(one_process, char_data, tmp_path, background):
    port = free_port()
    nodes = [background(torchrun("--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                                 "--master_addr=127.0.0.1", f"--master_port={port}", args=args_for(tmp_path, char_data)))
             for rank in (0, 1)]
    outputs = [node.wait(timeout=300) for node in nodes]
    assert [code for code, _, _ in outputs] == [0, 0], outputs
    assert "2 process(es), ddp" in outputs[0][1] and outputs[1][1] == ""  # only rank 0 prints
    assert_same_run(tmp_path, one_process)


@pytest.mark.parametrize("saved_by, resumed_by", [
    (("fsdp", 2), ("ddp", 1)),  # DCP shards of 2 ranks, into one plain process
    (("ddp", 2), ("fsdp", 2)),  # one full file, into 2 shards
])
def test_a_checkpoint_resumes_on_another_world_size_and_layout(saved_by, resumed_by, one_process, char_data,
                                                               tmp_path):
    def launch(parallelism: str, processes: int, *extra: str) -> None:
        args = args_for(tmp_path, char_data, f"parallelism={parallelism}", *extra)
        if processes == 1:
            train_in_process(args)
        else:
            run_ok(torchrun("--standalone", f"--nproc_per_node={processes}", args=args))

    launch(*saved_by, "max_iters=3")  # stops (as if killed) at iter 3 of 6
    launch(*resumed_by, "init_from=resume")
    assert_same_run(tmp_path, one_process)


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
LAUNCH_2 = [sys.executable, "-m", "gptrain.cli", "launch", "--standalone", "--nproc_per_node=2"]


@pytest.mark.parametrize("launcher, sig, exit_code", [
    (TORCHRUN_2, signal.SIGTERM, 1),  # torchrun re-raises the signal it received, whatever its workers did
    (LAUNCH_2, signal.SIGTERM, 0),  # ours reports the clean stop
    (LAUNCH_2, signal.SIGUSR1, 0),
    (LAUNCH_2, signal.SIGINT, 0),  # Ctrl-C: to the launcher's process group, torchrun and its workers aside
    ([sys.executable], signal.SIGTERM, 0),  # one process, no launcher
    ([sys.executable], signal.SIGINT, 0),
], ids=["torchrun", "launch-TERM", "launch-USR1", "launch-Ctrl-C", "one-process", "one-process-Ctrl-C"])
def test_a_stop_signal_checkpoints_the_step_reached_and_resumes(launcher, sig, exit_code, char_data, tmp_path,
                                                                background):
    long_run = ["max_iters=100000", "lr_decay_iters=1000", "eval_interval=100000"]
    job = background([*launcher, "train.py", *args_for(tmp_path, char_data, *long_run)])
    wait_for_records(tmp_path, 6)
    if sig == signal.SIGINT:
        job.ctrl_c()
    else:
        job.process.send_signal(sig)  # as a scheduler does, to the first process
    code, stdout, stderr = job.wait(timeout=120)

    assert code == exit_code, stdout + stderr
    stopped = load_checkpoint(tmp_path / "out" / "ckpt.pt").progress.step
    logged = max(by_step(records(tmp_path), "train/loss"))
    assert stopped == logged + 1 >= 5, stdout + stderr  # every step that ran is in the checkpoint
    assert f"stopped at iter {stopped} on {sig.name}; continue with init_from=resume" in stdout, stdout + stderr
    assert "gptrain/" not in stderr  # no traceback from the training processes

    resumed = train_in_process(args_for(tmp_path, char_data, *long_run, "init_from=resume",
                                        f"max_iters={stopped + 3}"))
    whole = train_in_process(args_for(tmp_path / "whole", char_data, *long_run, f"max_iters={stopped + 3}"))
    # the steps before the stop ran on as many processes as the launcher started, whose gradients are
    # summed in another order: a difference that grows with the steps run, 1e-5 of the loss after 30
    assert by_step(resumed, "train/loss") == pytest.approx(
        {s: v for s, v in by_step(whole, "train/loss").items() if s >= stopped}, rel=2e-5)


# steps of a second or more (a few on a busy machine), so that a second Ctrl-C lands before the first's save
SLOW_STEPS = ["n_layer=4", "n_head=4", "n_embd=128", "block_size=256", "batch_size=8", "tokens_per_step=16384",
              "eval_iters=1", "max_iters=100000", "lr_decay_iters=1000", "eval_interval=100000"]


@pytest.mark.parametrize("launcher, exit_code", [
    (LAUNCH_2, 1),  # torchrun's, for workers that failed
    ([sys.executable], 130),  # the shell's for Ctrl-C
], ids=["launch", "one-process"])
def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(launcher, exit_code, char_data, tmp_path, background):
    """The first Ctrl-C lands just after a step's record, so the step it waits for has barely begun."""
    job = background([*launcher, "train.py", *args_for(tmp_path, char_data, *SLOW_STEPS)])
    wait_for_records(tmp_path, 3)  # the evaluation at step 0, then steps 0 and 1
    job.ctrl_c()
    deadline = time.monotonic() + 30
    while "Ctrl-C again stops at once" not in job.stderr.read_text():  # the first one was taken
        assert time.monotonic() < deadline and job.process.poll() is None, job.stderr.read_text()
        time.sleep(0.05)
    job.ctrl_c()
    code, stdout, stderr = job.wait(timeout=60)

    assert code == exit_code, stdout + stderr
    assert "stopped at iter" not in stdout and "saved" not in stdout
    assert "Traceback" not in stderr or launcher == LAUNCH_2, stderr  # torchrun's own may print one
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml", "environment.json",
                                                                    "metrics.jsonl"]  # no checkpoint, no temporary


# What the surviving rank says, in one line: who stopped answering, at which step, how to go on.
TIMED_OUT_LINE = (r"error: rank 1 did not answer within dist_timeout_s=5 s: a collective timed out at iter \d+ "
                  r"on rank 0 \(Timed out waiting 5000ms for (send|recv) operation to complete\)\. .*continue with "
                  r"init_from=resume")
WENT_AWAY_LINE = (r"error: rank 1 went away: a collective failed at iter \d+ on rank 0 \([^()]*(Connection "
                  r"(closed|reset) by peer|Broken pipe|Socket closed)[^()]*\)\. It died or was killed; continue with "
                  r"init_from=resume")
LINE_MARGIN_S = 5  # beyond the timeout, until the line: the step under way (0.1 s measured), under any load
MARGIN_S = 20  # until the exit, Python's finalization included (4 to 7 s measured at load 15 on 2 cores)


@pytest.mark.parametrize("failure, line", [
    (signal.SIGSTOP, TIMED_OUT_LINE),  # hung, not dead: its sockets stay open until the timeout
    (signal.SIGKILL, WENT_AWAY_LINE),  # dead: noticed at the next collective
], ids=["stopped", "killed"])
def test_a_rank_that_hangs_or_dies_stops_the_others_within_the_timeout(failure, line, char_data, tmp_path,
                                                                        background):
    """Launched without torchrun, which would otherwise stop the job itself: only the ranks can notice.

    Rank 0 meets the timeout at its next collective, at most a step after rank 1 stopped: its line came
    5.0 to 5.1 s after SIGSTOP with dist_timeout_s=5, its exit 4 to 7 s later still (Python's finalization of
    torch alone takes 3 to 5 s on this 2-core machine at load 15), so 9 to 12 s in all; the margins leave
    room for a busier machine. Exit status 1: a failure at run time, not bad input (2)."""
    port, timeout = free_port(), 5
    args = args_for(tmp_path, char_data, "max_iters=100000", "lr_decay_iters=1000", "eval_interval=100000",
                    f"dist_timeout_s={timeout}")
    ranks = [background([sys.executable, "train.py", *args],
                        env={**ENV, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in (0, 1)]
    wait_for_records(tmp_path, 4)
    ranks[1].process.send_signal(failure)
    failed_at = time.monotonic()
    while not ranks[0].stderr.read_text() and time.monotonic() - failed_at < timeout + MARGIN_S:
        time.sleep(0.05)
    said_after = time.monotonic() - failed_at
    code, _, stderr = ranks[0].wait(timeout=timeout + MARGIN_S - said_after)  # raises if it takes longer
    assert said_after < timeout + LINE_MARGIN_S, stderr
    assert code == 1, stderr
    assert re.fullmatch(line, stderr.strip()), stderr[-3000:]  # one line, no traceback


@pytest.mark.parametrize("gloo, world_size, line", [
    ("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete", 2,
     "rank 1 did not answer within dist_timeout_s=5 s: a collective timed out at iter 7 on rank 0 (Timed out waiting "
     "5000ms for recv operation to complete). It hung, was stopped, or is slower than that (then raise "
     "dist_timeout_s); continue with init_from=resume"),
    ("[../gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:4321", 8,
     "another rank went away: a collective failed at iter 7 on rank 0 (Connection closed by peer [127.0.0.1]:4321). "
     "It died or was killed; continue with init_from=resume"),
    ("[../gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4321: Connection reset by peer. This is typically "
     "caused by a remote worker hanging or bugs in the application. GLHF!", 2, "(Read error [127.0.0.1]:4321: "
     "Connection reset by peer)"),
    ("[../gloo/transport/tcp/pair.cc:312] writev [127.0.0.1]:4321: Broken pipe", 2,
     "(writev [127.0.0.1]:4321: Broken pipe)"),
    ("[../gloo/transport/tcp/pair.cc:203] Socket closed [127.0.0.1]:4321", 2, "(Socket closed [127.0.0.1]:4321)"),
    ("mat1 and mat2 shapes cannot be multiplied (4x32 and 64x32)", 2, None),  # not a rank's doing: its traceback
], ids=["timed-out", "closed", "reset", "broken-pipe", "socket-closed", "other"])
def test_gloo_errors_of_a_lost_rank_become_one_line(gloo, world_size, line):
    """gloo's messages as its sources word them, including those the killed-rank test meets only now and then."""
    failure = lost_rank(RuntimeError(gloo), DistInfo(0, 0, world_size, True), timeout_s=5, step=7)
    if line is None:
        assert failure is None
    else:
        assert line in str(failure) and "\n" not in str(failure)


@pytest.mark.parametrize("args, message", [
    (["tokens_per_step=null", "gradient_accumulation_steps=3"],
     "gradient_accumulation_steps (3) must be divisible by the number of processes (2)"),
    (["tokens_per_step=96"], "tokens_per_step (96) is 3 sequences of 32 tokens, which 2 processes cannot share evenly"),
    (["parallelism=model"], "parallelism must be one of ddp, fsdp (got 'model')"),
])
def test_bad_distributed_settings_stop_with_one_line_under_torchrun(args, message, char_data, tmp_path):
    result = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", args=args_for(tmp_path, char_data, *args)),
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr  # printed once, not once per rank
    ours = result.stderr.split("failed (exitcode: 2)")[0]  # what follows is torchrun's own failure report
    assert "Traceback" not in ours and "gptrain/" not in result.stderr


def test_fsdp_without_torchrun_stops_with_one_line(char_data, tmp_path):
    result = subprocess.run([sys.executable, "train.py", *args_for(tmp_path, char_data, "parallelism=fsdp")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: parallelism=fsdp shards the model across processes: launch with torchrun")
    assert len(result.stderr.splitlines()) == 1


def _signal_one_rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    from gptrain.distributed import DistInfo, StopRequest

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with StopRequest(DistInfo(rank, rank, 2, True), torch.device("cpu")) as stop:
        before = stop.requested()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        results.put((rank, before, stop.requested(), stop.name if stop.signal else None))
    dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_and_each_knows_which(tmp_path):
    results = run_two_ranks(_signal_one_rank, tmp_path)
    assert sorted(results.get(timeout=10) for _ in range(2)) == [(0, False, True, "SIGUSR1"),
                                                                 (1, False, True, "SIGUSR1")]


INITIAL_WEIGHTS = """
import sys, torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from gptrain.config import load_config
from gptrain.model import GPT
from gptrain.distributed import dist_info, init_distributed, parallelize, place_whole
from gptrain.model import GPT

config = load_config(sys.argv[2:])
info = dist_info()
init_distributed(info, "gloo", torch.device("cpu"), 60)
with torch.device("meta"):
    model = GPT(config.model_config())
parallelize(model, config, info, torch.device("cpu"), torch.float32,
            fill=lambda m: m.init_weights(config.seed, place=place_whole))
whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if info.is_main:
    torch.save(whole, sys.argv[1])
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("switches", [[], ["pos_emb=rope", "norm=rmsnorm", "mlp=swiglu", "tie_embeddings=false"]],
                         ids=["gpt2", "modern"])
def test_initial_weights_do_not_depend_on_the_world_size_or_sharding(switches, tmp_path):
    """Built on the meta device, sharded, then drawn whole parameter by parameter: FSDP over 2 processes
    starts from exactly the weights of one process (n_layer=3 and vocab 65: shards of uneven sizes)."""
    script = tmp_path / "initial_weights.py"
    script.write_text(INITIAL_WEIGHTS)
    settings = [*RUN, "n_layer=3", "vocab_size=65", "data_dir=.", *switches]
    run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
            str(tmp_path / "fsdp.pt"), "parallelism=fsdp", *settings])
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    config = load_config(settings)
    with torch.device("meta"):
        alone = GPT(config.model_config())
    alone.to_empty(device="cpu")
    alone.init_weights(config.seed)
    assert sharded.keys() == alone.state_dict().keys()
    for name, tensor in alone.state_dict().items():
        assert torch.equal(sharded[name], tensor), name
    assert sharded["transformer.h.0.attn.c_attn.weight"].std() > 0.01  # drawn, not left at zero
