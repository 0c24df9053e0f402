"""Everything that knows about ranks: torchrun's environment, process groups, DDP and FSDP, stopping
together on a signal, rank-0 helpers. The model itself never mentions any of it."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from gptrain.config import ConfigError, TrainConfig
from gptrain.errors import RunError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # under torchrun (even with one process), so there is a process group to join

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """This process's place as torchrun describes it in RANK/WORLD_SIZE; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), True)


def check_parallelism(config: TrainConfig, info: DistInfo) -> None:
    """What the launch decides, checked on every rank before any process group is joined."""
    if config.parallelism == "fsdp" and not info.launched:
        raise ConfigError("parallelism=fsdp shards the model across processes: launch with torchrun "
                          "(e.g. torchrun --standalone --nproc_per_node=2 train.py parallelism=fsdp)")
    if config.parallelism == "fsdp" and config.dtype == "float16":
        raise ConfigError("parallelism=fsdp takes dtype float32 or bfloat16: float16's gradient scaler "
                          "does not agree across shards")
    if config.parallelism == "fsdp" and config.batch_size == "auto":
        raise ConfigError("batch_size=auto probes memory with parallelism=ddp only; give fsdp a number")


def init_distributed(info: DistInfo, backend: str, device: torch.device, timeout_s: int) -> None:
    """Join the process group. NCCL only carries CUDA tensors, so a CPU run takes gloo whatever was asked.
    A collective that waits `timeout_s` for a process that died or hung raises instead of waiting forever."""
    if not info.launched:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def teardown(finished: bool) -> None:
    """Leave the process group. After a clean finish, first wait for every rank (rank 0 may still be
    writing); after an error, leave at once, so the error surfaces and torchrun stops the other ranks."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


class LostRank(RunError):
    """Another process hung, was stopped or died; which ranks see it depends on which one failed."""

    every_rank = True


# How gloo says that the process at the other end of a collective stopped answering...
TIMED_OUT = re.compile(r"Timed out waiting \d+ ?ms for (send|recv) operation")
# A process that went away: seen by a read (closed, reset), by a write (reset, broken pipe), or by an operation
# begun after gloo saw the close (socket closed).
WENT_AWAY = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Socket closed")


def lost_rank(error: RuntimeError, info: DistInfo, *, timeout_s: int, step: int | None) -> LostRank | None:
    """A collective's failure as one line, when the cause is another process that hung, was stopped or died;
    None for any other error, which keeps its traceback. gloo does not say which process: with two, the other."""
    text = str(error)
    timed_out, went_away = TIMED_OUT.search(text), WENT_AWAY.search(text)
    if not info.enabled or not (timed_out or went_away):
        return None
    other = f"rank {1 - info.rank}" if info.world_size == 2 else "another rank"
    where = f"at iter {step}" if step is not None else "before training began"
    gloo = text.split("] ", 1)[-1].split(". ")[0].splitlines()[0]  # its first sentence, after [source:line]
    if timed_out:
        return LostRank(f"{other} did not answer within dist_timeout_s={timeout_s} s: a collective timed out "
                        f"{where} on rank {info.rank} ({gloo}). It hung, was stopped, or is slower than that "
                        f"(then raise dist_timeout_s); continue with init_from=resume")
    return LostRank(f"{other} went away: a collective failed {where} on rank {info.rank} ({gloo}). It died or "
                    f"was killed; continue with init_from=resume")


def parallelize(model: nn.Module, config: TrainConfig, info: DistInfo, device: torch.device, dtype: torch.dtype, *,
                fill: Callable[[nn.Module], None]) -> nn.Module:
    """Turn a model built on the meta device into what the loop calls, in torchtitan's order: shard (FSDP),
    allocate each rank's part on `device`, `fill` it with weights, then compile and wrap for DDP. Returns
    the module the loop calls; the parameters stay those of `model`, so checkpoints and the optimizer use
    it directly. Nothing is ever allocated whole on one rank but by `fill`, one parameter at a time.

    ddp: a full copy on every process; gradients are all-reduced.
    fsdp: each block, then the rest (embeddings, head), is sharded over the processes (FSDP2);
    a block's full weights exist only while it runs. Its precision policy replaces autocast:
    weights are gathered in `dtype`, gradients reduced in float32.
    """
    fsdp = config.parallelism == "fsdp"
    if fsdp:
        mesh = init_device_mesh(device.type, (info.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                      reduce_dtype=torch.float32)
        for block in model.transformer.h:
            if config.compile:
                block.compile()  # in place, per block: parameter names keep no _orig_mod. prefix
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    fill(model)
    if fsdp:
        return model
    return _ddp(torch.compile(model) if config.compile else model, info, device)


def own_slice(whole: torch.Tensor, mesh: DeviceMesh, placements) -> torch.Tensor:
    """This rank's slice, as `placements` cut it over `mesh`, of a tensor that every rank holds whole and
    alike: cut locally, with no collective."""
    return distribute_tensor(whole, mesh, placements, src_data_rank=None).to_local()


def place_whole(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter; a sharded one (FSDP) keeps only its own slice of it, so the
    weights do not depend on the world size."""
    value = value.to(param.device)
    if isinstance(param, DTensor):
        value, param = own_slice(value, param.device_mesh, param.placements), param.to_local()
    param.copy_(value)


def _ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap for DDP when there are several processes; DDP broadcasts rank 0's weights on the way."""
    if not info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def eager(raw_model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """`parallelize`'s result without torch.compile: what the loop falls back to when compiling fails."""
    if isinstance(raw_model, FSDPModule):
        for block in raw_model.transformer.h:
            block._compiled_call_impl = None  # where nn.Module.compile() keeps the compiled forward
        return raw_model
    return _ddp(raw_model, info, device)


def min_across_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    if info.enabled:
        tensor = torch.tensor([value], device=device)  # NCCL carries only CUDA tensors
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        value = int(tensor.item())
    return value


def gradient_sync(model: nn.Module, enabled: bool) -> AbstractContextManager:
    """Whether the coming backward reduces gradients across processes: only the last micro-batch of a
    step needs to, the others accumulate locally."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns it as a plain tensor, also when the gradients are sharded."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def sum_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return sum_across_ranks(value, info) / info.world_size  # SUM then divide: gloo has no AVG


class StopRequest:
    """SIGTERM or SIGUSR1, what SLURM and Kubernetes send before a kill, or a first Ctrl-C (SIGINT), asks the
    run to stop cleanly: every rank finishes its step, the ranks agree, the run checkpoints and exits 0.
    A second Ctrl-C stops at once, without a checkpoint: after the first, SIGINT raises Python's usual
    KeyboardInterrupt again.

    Use as a context manager around the loop; it restores the previous handlers on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, info: DistInfo, device: torch.device):
        self.info = info
        self.received = 0  # the number of the first signal this process received; only the handler writes it
        self.signal = 0  # the one the ranks agreed on, 0 while none
        self._previous: dict = {}
        # The flag crosses over gloo on the CPU, so asking every step never waits for the GPU.
        self._group = dist.new_group(backend="gloo") if info.enabled and device.type != "cpu" else None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python only lets it set handlers
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C interrupts at once
            if self.info.local_rank == 0:  # once per terminal; os.write, as print() may be mid-print in the loop
                os.write(2, b"Ctrl-C: stopping after this step with a checkpoint; Ctrl-C again stops at once, "
                            b"without one\n")

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name

    def requested(self) -> bool:
        """True on every rank as soon as any rank has received a signal (a collective when distributed);
        then every rank also knows which. A signal that lands during the collective counts at the next call."""
        self.signal = self.received
        if self.info.enabled:
            flag = torch.tensor([self.signal])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            self.signal = int(flag.item())
        return self.signal != 0


def print0(info: DistInfo, text: str) -> None:
    if info.is_main:
        tqdm.write(text)  # above the progress bar, when there is one
