"""Checkpoints that are either complete or absent, and load without running code from the file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from gptrain.config import GPTConfig

# Wrappers that prefix parameter names: torch.compile (_orig_mod.) and DistributedDataParallel (module.).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the run."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write to a temporary file in the same directory, fsync it, then rename over `path`.

    The rename is atomic, so a crash at any moment leaves either the previous checkpoint or the new
    one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
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


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with weights_only=True (tensors and plain containers only) and strip wrapper prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean the same to the user
        raise CheckpointError(f"cannot load {path}: {str(e).splitlines()[0]}") from e
    if "model" not in state:
        raise CheckpointError(f"{path} has no 'model' entry; is it a gptrain or nanoGPT checkpoint?")
    state["model"] = clean_state_dict(state["model"])
    return state


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
