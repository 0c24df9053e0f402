"""Checkpoints that are either complete or absent, verify their own contents, load without running code
from the file, and load into any layout: one process, DDP or FSDP, on any number of processes.

Each save writes `ckpt-<iter>.pt`; `ckpt.pt` is always the newest (a hard link to it, or a copy) and
`ckpt-best.pt` the best by val loss, and only the newest `keep_last_n` of the numbered ones stay. Each file
carries a SHA-256 of its contents, checked on every load, so a truncated or corrupted file is refused, and
a resume falls back to the newest one that verifies.

A checkpoint file holds the run state (config, step, best val loss, tokenizer). A DDP or one-process run puts
the full weights and optimizer state in it too. An FSDP run writes them sharded, one writer per rank, with
torch.distributed.checkpoint (DCP) into `ckpt-<iter>.dcp/` beside it, which the file names (and its checksum
covers the run state only; DCP's own metadata guards the shards); DCP reshards on load, so the world size may
change between runs.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
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
from gptrain.errors import UserError

# Wrappers that prefix parameter names: torch.compile (_orig_mod.) and DistributedDataParallel (module.).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
NUMBERED = re.compile(r"ckpt-(\d+)\.pt")


class CheckpointError(UserError):
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


def save_checkpoint(out_dir: str | Path, run_state: dict, *, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                    info: DistInfo, sharded: bool, keep_last_n: int = 1, best: bool = False) -> Path:
    """Write ckpt-<iter>.pt, point ckpt.pt (and ckpt-best.pt when `best`) at it, then drop the numbered ones
    beyond the newest keep_last_n. Every rank calls it. Parameter names are the bare model's, whatever wraps
    it. Until ckpt-<iter>.pt is complete nothing else changes, so a failure (a full disk) leaves every
    earlier checkpoint as it was."""
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt-{run_state['iter_num']:06d}.pt"
    if sharded:
        folder = path.with_suffix(".dcp")
        if info.is_main and folder.exists():  # left by a save that died, or by a run resumed from before it
            shutil.rmtree(folder)
        dist.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizers)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
        dist.barrier()  # every shard is on disk before a checkpoint file names them
        run_state = {**run_state, "sharded": folder.name}
    elif info.is_main:
        model_state, optimizer_state = get_state_dict(model, optimizers)
        run_state = {**run_state, "model": model_state, "optimizer": optimizer_state}
    if info.is_main:
        atomic_torch_save({**run_state, "checksum": checksum(run_state)}, path)
        _point(out_dir / "ckpt.pt", path)
        if best:
            _point(out_dir / "ckpt-best.pt", path)
        _prune(out_dir, keep_last_n, run_state["iter_num"])
    return path


def checksum(state: dict) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's bytes, dtype and shape, every other value's repr,
    in order. It is computed from what torch.load gives back, so it checks the file end to end."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key, item in value.items():
                feed(key)
                feed(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed(state)
    return digest.hexdigest()


def _point(link: Path, target: Path) -> None:
    """Make `link` name the same file as `target`, atomically: a hard link, or a synced copy where links fail."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(target, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, link)


def _numbered(out_dir: Path) -> list[tuple[int, Path]]:
    """The ckpt-<iter>.pt files of out_dir, oldest first."""
    return sorted((int(m.group(1)), p) for p in out_dir.glob("ckpt-*.pt") if (m := NUMBERED.fullmatch(p.name)))


def _prune(out_dir: Path, keep_last_n: int, newest: int) -> None:
    """Drop numbered checkpoints older than the newest keep_last_n, those newer than `newest` (and a ckpt-best.pt
    among them: left by a run since resumed from an earlier one), then the DCP folders no remaining file names."""
    numbered, best = _numbered(out_dir), out_dir / "ckpt-best.pt"
    kept = [p for step, p in numbered if step <= newest][-keep_last_n:]
    if best.exists() and any(step > newest and best.samefile(p) for step, p in numbered):
        best.unlink()
    for _, p in numbered:
        if p not in kept:
            p.unlink()
    folders = {folder.name: folder for folder in out_dir.glob("ckpt-*.dcp")}
    named = {p.with_suffix(".dcp").name for p in kept}
    if best.exists() and folders:  # its own numbered file may be gone: the small file names its folder
        try:
            named.add(torch.load(best, map_location="cpu", weights_only=True).get("sharded"))
        except Exception:  # unreadable: a best that cannot be loaded is no best
            best.unlink()
    for name, folder in folders.items():
        if name not in named:
            shutil.rmtree(folder)


def newest_checkpoint(out_dir: str | Path) -> tuple[dict, Path, list[str]]:
    """The newest checkpoint in out_dir that loads and verifies: the numbered ones from the newest down, then
    ckpt.pt (alone in an out_dir written before numbered checkpoints). Returns it, its path, and a line for
    each newer one skipped, saying why."""
    out_dir = Path(out_dir)
    candidates = [p for _, p in reversed(_numbered(out_dir))] + [out_dir / "ckpt.pt"]
    skipped, tried = [], []
    for path in candidates:
        if not path.is_file() or any(path.samefile(other) for other in tried):  # ckpt.pt: a numbered one's twin
            continue
        tried.append(path)
        try:
            return load_checkpoint(path), path, skipped
        except CheckpointError as e:
            skipped.append(str(e))
    if not tried:
        raise CheckpointError(f"no checkpoint to resume in {out_dir}: train with init_from=scratch first")
    raise CheckpointError(f"no checkpoint in {out_dir} loads: {'; '.join(skipped)}")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The run state, with the full weights when the file holds them. Loads with weights_only=True
    (tensors and plain containers only) and strips wrapper prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean the same to the user
        if not zipfile.is_zipfile(path):  # what torch.save writes, its index at the end
            reason = "not a file torch.save wrote, or one cut short (truncated)"
        elif isinstance(e, pickle.UnpicklingError):
            reason = "it holds Python objects beyond tensors and plain containers, whose code gptrain never runs"
        else:
            reason = str(e).splitlines()[0]
        raise CheckpointError(f"cannot load {path}: {reason}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint")
    saved = state.pop("checksum", None)  # nanoGPT's checkpoints, and gptrain's before 0.2, have none
    if saved is not None and checksum(state) != saved:
        raise CheckpointError(f"{path} is corrupt: its contents do not match the checksum written with them")
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
        full = StateDictOptions(full_state_dict=True)  # every rank holds it all; FSDP keeps its own shard
        set_model_state_dict(model, checkpoint["model"], options=full)
        if optimizers:
            saved = checkpoint["optimizer"]
            if any(isinstance(k, int) for k in saved["state"]):
                saved = _named_optimizer_state(model, optimizers, checkpoint, path)
            set_optimizer_state_dict(model, optimizers, saved, options=full)
    except (RuntimeError, KeyError, ValueError, CheckpointException) as e:
        raise CheckpointError(f"cannot load the weights of {path} into this model: {str(e).splitlines()[0]}") from e


def _named_optimizer_state(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], checkpoint: dict,
                           path: Path) -> dict:
    """nanoGPT's AdamW state (and gptrain 0.1's), kept by position, as this run's optimizers keep it: by name.

    Its two groups hold the 2-D parameters, then the others, each in the order of the saved model's own
    parameters: its state dict's, less the head tied to the token embedding and the attention-mask buffers."""
    weights = {n: t for n, t in checkpoint["model"].items() if n != "lm_head.weight" and not n.endswith(".attn.bias")}
    names = [n for n, t in weights.items() if t.dim() >= 2] + [n for n, t in weights.items() if t.dim() < 2]
    saved, params = checkpoint["optimizer"], dict(model.named_parameters())
    positions = sorted(i for group in saved["param_groups"] for i in group["params"])
    mismatch = positions != list(range(len(names))) or set(names) != set(params) or any(
        state["exp_avg"].shape != weights[names[i]].shape for i, state in saved["state"].items())
    if len(optimizers) != 1 or mismatch:
        raise CheckpointError(f"{path} keeps its optimizer state by position (nanoGPT's AdamW layout), which does not "
                              f"fit this model and optimizer=adamw; fine-tune from its weights with init_from={path} "
                              f"instead of resuming")
    _, ours = get_state_dict(model, optimizers, options=StateDictOptions(full_state_dict=True))
    return {"state": {names[i]: state for i, state in saved["state"].items()}, "param_groups": ours["param_groups"]}


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
