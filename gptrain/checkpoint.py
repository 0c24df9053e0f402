"""Checkpoints that are either complete or absent, load without running code from the file, and load
into any layout: one process, DDP or FSDP, on any number of processes.

`ckpt.pt` is always a single file holding the run state (config, step, best val loss, tokenizer).
A DDP or one-process run puts the full weights and optimizer state in it too. An FSDP run writes them
sharded, one writer per rank, with torch.distributed.checkpoint (DCP) into `ckpt-<step>.dcp/` beside it,
and `ckpt.pt` names that folder; DCP reshards on load, so the world size may change between runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from gptrain.config import GPTConfig
from gptrain.distributed import DistInfo

# Wrappers that prefix parameter names: torch.compile (_orig_mod.) and DistributedDataParallel (module.).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the run."""


def atomic_torch_save(obj: dict, path: str | Path) -> None:
    """Write to a temporary file in the same directory, fsync it, then rename over `path`.

    The rename is atomic, so a crash at any moment leaves either the previous file or the new one,
    never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a checkpoint is shared like any output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, run_state: dict, *, model: nn.Module,
                    optimizers: list[torch.optim.Optimizer], info: DistInfo, sharded: bool) -> None:
    """Every rank calls it. Parameter names are the bare model's, whatever wraps it."""
    path = Path(path)
    folder = path.parent / f"ckpt-{run_state['iter_num']:06d}.dcp" if sharded else None
    if sharded:
        model_state, optimizer_state = get_state_dict(model, optimizers)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
        dist.barrier()  # every shard is on disk before ckpt.pt points at them
        run_state = {**run_state, "sharded": folder.name}
    elif info.is_main:
        model_state, optimizer_state = get_state_dict(model, optimizers)
        run_state = {**run_state, "model": model_state, "optimizer": optimizer_state}
    if info.is_main:
        atomic_torch_save(run_state, path)
        for old in path.parent.glob("ckpt-*.dcp"):  # shards that ckpt.pt no longer names
            if old != folder:
                shutil.rmtree(old)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The run state, with the full weights when the file holds them. Loads with weights_only=True
    (tensors and plain containers only) and strips wrapper prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean the same to the user
        raise CheckpointError(f"cannot load {path}: {str(e).splitlines()[0]}") from e
    if "sharded" in state:
        if not (path.parent / state["sharded"] / ".metadata").is_file():
            raise CheckpointError(f"{path} keeps its weights in {path.parent / state['sharded']}, which is missing "
                                  f"or incomplete")
        return state
    if "model" not in state:
        raise CheckpointError(f"{path} has no 'model' entry; is it a gptrain or nanoGPT checkpoint?")
    state["model"] = clean_state_dict(state["model"])
    return state


def load_weights(model: nn.Module, checkpoint: dict, path: str | Path,
                 optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """Fill `model` (and `optimizers`, when given) from a checkpoint in whatever layout `model` is:
    plain, DDP's inner module, or FSDP-sharded, from a file or from DCP shards of any world size."""
    path = Path(path)
    try:
        if "sharded" in checkpoint:
            model_state, optimizer_state = get_state_dict(model, optimizers)  # this run's layout, to fill
            state = {"model": model_state, **({"optimizer": optimizer_state} if optimizers else {})}
            with warnings.catch_warnings():  # on one process DCP warns that it assumes one process
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(state, checkpoint_id=path.parent / checkpoint["sharded"])
            set_model_state_dict(model, state["model"])
            if optimizers:
                set_optimizer_state_dict(model, optimizers, state["optimizer"])
            return
        if optimizers and any(isinstance(k, int) for k in checkpoint["optimizer"]["state"]):
            raise CheckpointError(f"{path} keeps its optimizer state by position, as gptrain 0.1 did; fine-tune "
                                  f"from its weights with init_from={path} instead of resuming")
        full = StateDictOptions(full_state_dict=True)  # every rank holds it all; FSDP keeps its own shard
        set_model_state_dict(model, checkpoint["model"], options=full)
        if optimizers:
            set_optimizer_state_dict(model, optimizers, checkpoint["optimizer"], options=full)
    except (RuntimeError, KeyError, ValueError, CheckpointException) as e:
        raise CheckpointError(f"cannot load the weights of {path} into this model: {str(e).splitlines()[0]}") from e


def clean_state_dict(state_dict: dict) -> dict:
    """Parameter names as the bare model has them, whatever wrapped it when it was saved."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def model_config_from(checkpoint: dict, **overrides) -> GPTConfig:
    """The model's shape as a checkpoint records it (ours: model_config; nanoGPT's: model_args)."""
    saved = checkpoint.get("model_config") or checkpoint.get("model_args")
    if saved is None:
        raise CheckpointError("the checkpoint does not record the model's shape (model_config)")
    known = GPTConfig.__dataclass_fields__
    return GPTConfig(**{**{k: v for k, v in saved.items() if k in known}, **overrides})
