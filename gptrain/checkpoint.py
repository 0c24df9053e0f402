"""Checkpoints: the one module that knows what a checkpoint holds. They are either complete or absent,
verify their own contents, load without running code from the file, and load into any layout: one
process, DDP or FSDP, on any number of processes.

A checkpoint is saved and loaded by name: the run's progress (step, tokens seen, best val loss, skipped
steps), its record (settings, tokenizer, machine, W&B run), the model's shape, and the resumable parts
(model, optimizers, gradient scaler). Every rank makes the same save and load calls; where the tensors go
is one of two layouts. One process or DDP: whole, inside the file, which rank 0 writes. FSDP: sharded,
each rank writing its own with torch.distributed.checkpoint (DCP) into `ckpt-<step>.dcp/` beside the file,
which names the folder; DCP reshards on load, so the world size may change between runs.

Each save writes `ckpt-<step>.pt`; `ckpt.pt` is always the newest (a hard link to it, or a copy) and
`ckpt-best.pt` the best by val loss, and only the newest `keep_last_n` of the numbered ones stay. Each file
carries a SHA-256 of its contents, checked on every load, so a truncated or corrupted file is refused, and
a resume falls back to the newest one that verifies. Checkpoints of gptrain before 0.2 and of nanoGPT
(`iter_num` for the step, `model_args` for the shape, AdamW state by position) load too.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, get_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)

from gptrain import tokenizer as tokenizers
from gptrain.config import ConfigError, GPTConfig
from gptrain.data import DataError, read_meta
from gptrain.distributed import DistInfo
from gptrain.errors import UserError
from gptrain.files import atomic_write, publish
from gptrain.model import GPT

# Wrappers that prefix parameter names: torch.compile (_orig_mod.) and DistributedDataParallel (module.).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
NUMBERED = re.compile(r"ckpt-(\d+)\.pt")
WHOLE = StateDictOptions(full_state_dict=True)  # every rank holds it all; an FSDP rank keeps its own shard


class CheckpointError(UserError):
    """A checkpoint that is missing or does not fit the run."""


@dataclass
class Progress:
    """How far a run has come: what a resumed run continues from."""

    step: int = 0  # optimizer steps taken; with the seed, also the data position
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    skipped_steps: int = 0  # not finite: no update made
    overflow_steps: int = 0  # skipped by float16's gradient scaler


@dataclass
class RunRecord:
    """What a run is: its settings, the tokenizer of its data, the machine it ran on, its W&B run."""

    config: dict = field(default_factory=dict)  # the TrainConfig, as a dict: older ones may lack today's keys
    tokenizer: dict | None = None  # meta.json's "tokenizer" entry
    environment: dict = field(default_factory=dict)
    wandb_id: str | None = None


@dataclass
class Checkpoint:
    """A checkpoint as loaded: what it says, by name, and its tensors (or the folder of its shards)."""

    path: Path
    model_config: GPTConfig
    progress: Progress = field(default_factory=Progress)
    record: RunRecord = field(default_factory=RunRecord)
    origin: str = "gptrain"  # or "nanoGPT" (no data position saved), or "Hugging Face" (weights alone)
    tensors: dict = field(default_factory=dict, repr=False)  # "model", "optimizer", "scaler", as saved
    shards: Path | None = None  # an FSDP checkpoint's DCP folder, which holds its model and optimizer state

    def load_weights(self, model: nn.Module) -> None:
        """Fill `model`, in whatever layout it is (plain, DDP's inner module, FSDP-sharded)."""
        with self._loading():
            if self.shards is None:
                set_model_state_dict(model, self.tensors["model"], options=WHOLE)
                return
            state = {"model": get_model_state_dict(model)}  # this run's layout, to fill
            _read_shards(self.shards, state)
            set_model_state_dict(model, state["model"])

    def load_training_state(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                            scaler: torch.amp.GradScaler) -> None:
        """The optimizers' state (momenta, step counts) and the gradient scaler's, for a resumed run."""
        with self._loading():
            if self.shards is not None:
                state = {"optimizer": get_optimizer_state_dict(model, optimizers)}
                _read_shards(self.shards, state)  # in place, into the optimizers' own state tensors
                set_optimizer_state_dict(model, optimizers, state["optimizer"])  # and what is not a tensor
            else:
                saved = self.tensors["optimizer"]
                if any(isinstance(k, int) for k in saved["state"]):  # nanoGPT's layout: by position
                    saved = self._named_optimizer_state(model, optimizers)
                set_optimizer_state_dict(model, optimizers, saved, options=WHOLE)
        if scaler.is_enabled() and self.tensors.get("scaler"):  # empty when the run before was not float16
            scaler.load_state_dict(self.tensors["scaler"])

    def cropped(self, block_size: int) -> Checkpoint:
        """This checkpoint for a shorter context: the first block_size rows of its learned position table
        (rotary positions are computed for any length)."""
        if self.model_config.pos_emb == "learned":
            if block_size > self.model_config.block_size:
                raise ConfigError(f"block_size={block_size} is larger than the {self.model_config.block_size} "
                                  f"learned positions of {self.path}; set block_size <= {self.model_config.block_size}")
            if self.shards is not None:
                raise CheckpointError(f"{self.path} is sharded, and its position table cannot be cropped to "
                                      f"block_size={block_size}; fine-tune at block_size={self.model_config.block_size}")
            wpe = "transformer.wpe.weight"
            model = {**self.tensors["model"], wpe: self.tensors["model"][wpe][:block_size].clone()}
            return replace(self, model_config=replace(self.model_config, block_size=block_size),
                           tensors={**self.tensors, "model": model})
        return replace(self, model_config=replace(self.model_config, block_size=block_size))

    def release(self) -> None:
        """Drop the tensors once they live in the model and optimizers: a large model's second copy."""
        self.tensors = {}

    @contextmanager
    def _loading(self) -> Iterator[None]:
        """Whatever goes wrong filling the model is the checkpoint not fitting it: one line."""
        try:
            yield
        except (RuntimeError, KeyError, ValueError, CheckpointException) as e:
            raise CheckpointError(f"cannot load {self.path} into this model: {str(e).splitlines()[0]}") from e

    def _named_optimizer_state(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict:
        """nanoGPT's AdamW state (and gptrain 0.1's), kept by position, as this run's optimizers keep it: by name.

        Its two groups hold the 2-D parameters, then the others, each in the order of the saved model's own
        parameters: its state dict's, less the head tied to the token embedding and the attention-mask buffers."""
        weights = {n: t for n, t in self.tensors["model"].items() if n != "lm_head.weight" and not n.endswith(".attn.bias")}
        names = [n for n, t in weights.items() if t.dim() >= 2] + [n for n, t in weights.items() if t.dim() < 2]
        saved, params = self.tensors["optimizer"], dict(model.named_parameters())
        positions = sorted(i for group in saved["param_groups"] for i in group["params"])
        mismatch = positions != list(range(len(names))) or set(names) != set(params) or any(
            state["exp_avg"].shape != weights[names[i]].shape for i, state in saved["state"].items())
        if len(optimizers) != 1 or mismatch:
            raise CheckpointError(f"{self.path} keeps its optimizer state by position (nanoGPT's AdamW layout), which "
                                  f"does not fit this model and optimizer=adamw; fine-tune from its weights with "
                                  f"init_from={self.path} instead of resuming")
        _, ours = get_state_dict(model, optimizers, options=WHOLE)
        return {"state": {names[i]: state for i, state in saved["state"].items()}, "param_groups": ours["param_groups"]}


def _read_shards(folder: Path, state: dict) -> None:
    with warnings.catch_warnings():  # on one process DCP warns that it assumes one process
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=folder)


def save_checkpoint(out_dir: str | Path, *, model: nn.Module, progress: Progress | None = None,
                    record: RunRecord | None = None, optimizers: Sequence[torch.optim.Optimizer] = (),
                    scaler: torch.amp.GradScaler | None = None, info: DistInfo = DistInfo(), sharded: bool = False,
                    keep_last_n: int = 1, best: bool = False) -> Path:
    """Write ckpt-<step>.pt, point ckpt.pt (and ckpt-best.pt when `best`) at it, then drop the numbered ones
    beyond the newest keep_last_n. Every rank calls it. Parameter names are the bare model's, whatever wraps
    it. Until ckpt-<step>.pt is complete nothing else changes, so a failure (a full disk) leaves every
    earlier checkpoint as it was."""
    out_dir, progress, record = Path(out_dir), progress or Progress(), record or RunRecord()
    path = out_dir / f"ckpt-{progress.step:06d}.pt"
    state = {"model_config": asdict(model.config), **asdict(progress), **asdict(record),
             "scaler": scaler.state_dict() if scaler is not None else {}}
    state |= (_save_shards if sharded else _gather_whole)(path, model, optimizers, info)
    if info.is_main:
        atomic_write(path, lambda f: torch.save({**state, "checksum": checksum(state)}, f))
        _point(out_dir / "ckpt.pt", path)
        if best:
            _point(out_dir / "ckpt-best.pt", path)
        _prune(out_dir, keep_last_n, progress.step)
    return path


def _gather_whole(path: Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], info: DistInfo) -> dict:
    """The whole layout: rank 0 puts the full weights and optimizer state into the file."""
    if not info.is_main:
        return {}
    model_state, optimizer_state = get_state_dict(model, optimizers)
    return {"model": model_state, "optimizer": optimizer_state}


def _save_shards(path: Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], info: DistInfo) -> dict:
    """The sharded layout: every rank writes its shards into ckpt-<step>.dcp/, which the file then names."""
    folder = path.with_suffix(".dcp")
    if info.is_main and folder.exists():  # left by a save that died, or by a run resumed from before it
        shutil.rmtree(folder)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizers)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    dist.barrier()  # every shard is on disk before a checkpoint file names them
    return {"sharded": folder.name}


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
    publish(tmp, link)


def _numbered(out_dir: Path) -> list[tuple[int, Path]]:
    """The ckpt-<step>.pt files of out_dir, oldest first."""
    return sorted((int(m.group(1)), p) for p in out_dir.glob("ckpt-*.pt") if (m := NUMBERED.fullmatch(p.name)))


def _prune(out_dir: Path, keep_last_n: int, newest: int) -> None:
    """Drop numbered checkpoints older than the newest keep_last_n, those newer than `newest` (and a ckpt-best.pt
    among them: left by a run since resumed from an earlier one), then the DCP folders no remaining file names,
    and what saves killed mid-write left behind."""
    for leftover in out_dir.glob(".ckpt*.tmp"):  # the temporary file of a save killed mid-write
        leftover.unlink(missing_ok=True)
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


def newest_checkpoint(out_dir: str | Path) -> tuple[Checkpoint, list[str]]:
    """The newest checkpoint in out_dir that loads and verifies: the numbered ones from the newest down, then
    ckpt.pt (alone in an out_dir written before numbered checkpoints). Returns it and a line for each newer
    one skipped, saying why."""
    out_dir = Path(out_dir)
    candidates = [p for _, p in reversed(_numbered(out_dir))] + [out_dir / "ckpt.pt"]
    skipped, tried = [], []
    for path in candidates:
        if not path.is_file() or any(path.samefile(other) for other in tried):  # ckpt.pt: a numbered one's twin
            continue
        tried.append(path)
        try:
            return load_checkpoint(path), skipped
        except CheckpointError as e:
            skipped.append(str(e))
    if not tried:
        raise CheckpointError(f"no checkpoint to resume in {out_dir}: train with init_from=scratch first")
    raise CheckpointError(f"no checkpoint in {out_dir} loads: {'; '.join(skipped)}")


def load_checkpoint(path: str | Path, map_location="cpu") -> Checkpoint:
    """A checkpoint file, verified, with its tensors (or the folder of its shards). Loads with
    weights_only=True (tensors and plain containers only: no code from the file runs) and strips wrapper
    prefixes from parameter names."""
    path = Path(path)
    state = _read(path, map_location)
    saved = state.pop("checksum", None)  # nanoGPT's checkpoints, and gptrain's before 0.2, have none
    if saved is not None and checksum(state) != saved:
        raise CheckpointError(f"{path} does not match the checksum saved with it: it is corrupt, or was changed "
                              f"after it was written. If you edited it on purpose, delete its 'checksum' entry and "
                              f"save it again to load it unverified")
    shape = state.get("model_config") or state.get("model_args")  # ours, or nanoGPT's
    if shape is None:
        raise CheckpointError(f"{path} does not record the model's shape (model_config); is it a gptrain or "
                              f"nanoGPT checkpoint?")
    shards = path.parent / state["sharded"] if "sharded" in state else None
    if shards is not None and not (shards / ".metadata").is_file():
        raise CheckpointError(f"{path} keeps its weights in {shards}, which is missing or incomplete")
    if shards is None and "model" not in state:
        raise CheckpointError(f"{path} has no 'model' entry; is it a gptrain or nanoGPT checkpoint?")
    model_config = GPTConfig(**{k: v for k, v in shape.items() if k in GPTConfig.__dataclass_fields__})
    tensors = {key: state[key] for key in ("model", "optimizer", "scaler") if key in state}
    if "model" in tensors:
        tensors["model"] = clean_state_dict(tensors["model"])
    return Checkpoint(path=path, model_config=model_config, progress=_progress(state, model_config),
                      record=RunRecord(config=state.get("config") or {}, tokenizer=state.get("tokenizer"),
                                       environment=state.get("environment") or {}, wandb_id=state.get("wandb_id")),
                      origin="nanoGPT" if "model_args" in state else "gptrain", tensors=tensors, shards=shards)


def _read(path: Path, map_location) -> dict:
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
    return state


def _progress(state: dict, model_config: GPTConfig) -> Progress:
    """A saved run's progress; older checkpoints say iter_num for the step (gptrain before 0.2, nanoGPT) and
    record no tokens seen: they follow from the step's batch."""
    step = state.get("step", state.get("iter_num", 0))
    config = state.get("config") or {}
    per_step = (config.get("batch_size") or 0) * (config.get("gradient_accumulation_steps") or 0) * model_config.block_size
    return Progress(step=step, tokens_seen=state.get("tokens_seen", step * per_step),
                    best_val_loss=state.get("best_val_loss", math.inf), skipped_steps=state.get("skipped_steps", 0),
                    overflow_steps=state.get("overflow_steps", 0))


def clean_state_dict(state_dict: dict) -> dict:
    """Parameter names as the bare model has them, whatever wrapped it when it was saved."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def load_model(path: str | Path, *, device: torch.device) -> tuple[GPT, Checkpoint]:
    """A checkpoint's model on `device`, in eval mode, and what the checkpoint says of it (its tokenizer,
    its settings); the checkpoint's own copy of the weights is released. What generate, eval, export,
    harness and serve all start from. The weights stay float32: commands run them under autocast."""
    checkpoint = load_checkpoint(path, map_location=device)
    with torch.device("meta"):  # no memory and no initialisation: the checkpoint fills it
        model = GPT(checkpoint.model_config)
    model.to_empty(device=device)
    checkpoint.load_weights(model)
    checkpoint.release()
    return model.eval(), checkpoint


def checkpoint_tokenizer(checkpoint: Checkpoint, meta_path: str | Path | None = None) -> tokenizers.Tokenizer:
    """The tokenizer a checkpoint was trained with: the one it records, or the vocabulary in `meta_path`,
    or for a nanoGPT checkpoint its dataset's meta.pkl, or else GPT-2's."""
    meta = checkpoint.record.tokenizer
    file = _vocabulary_file(checkpoint, meta_path) if meta is None or meta_path is not None else None
    if file is not None:
        meta = _tokenizer_meta_in(file)
        print(f"note: using the '{meta['name']}' tokenizer of {file}", file=sys.stderr)
    elif meta is None:  # e.g. a nanoGPT checkpoint of a GPT-2-tokenized dataset: the only safe guess
        if checkpoint.model_config.vocab_size < tokenizers.GPT2Tokenizer.vocab_size:
            raise CheckpointError(f"{checkpoint.path} records no tokenizer and its vocabulary is too small for "
                                  f"GPT-2's; give the vocabulary it was trained with: --meta data/DATASET/meta.pkl")
        print("note: the checkpoint records no tokenizer; using GPT-2's", file=sys.stderr)
        meta = {"name": "gpt2"}
    tokenizer = tokenizers.from_meta(meta)
    if tokenizer.vocab_size > checkpoint.model_config.vocab_size:
        raise CheckpointError(f"the tokenizer of {file or checkpoint.path} has {tokenizer.vocab_size} tokens, more "
                              f"than the model's vocab_size {checkpoint.model_config.vocab_size}: not the vocabulary "
                              f"it was trained with")
    return tokenizer


def _vocabulary_file(checkpoint: Checkpoint, meta_path: str | Path | None) -> Path | None:
    """Where the vocabulary of a checkpoint that records no tokenizer lives: `meta_path` (a meta.pkl or
    meta.json, or the data directory holding one), else, for a nanoGPT checkpoint, the meta.pkl of the
    dataset it names, data/<dataset>/, relative to the current directory as nanoGPT's sample.py reads it."""
    if meta_path is not None:
        path = Path(meta_path)
        if path.is_dir():
            found = [path / name for name in ("meta.json", "meta.pkl") if (path / name).is_file()]
            if not found:
                raise CheckpointError(f"--meta {meta_path}: the directory holds no meta.json or meta.pkl")
            return found[0]  # read_meta's preference too
        if path.name not in ("meta.json", "meta.pkl") or not path.is_file():
            raise CheckpointError(f"--meta {meta_path}: not a meta.json, a meta.pkl or a directory holding one")
        return path
    dataset = checkpoint.record.config.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        return None
    return next((f for f in (Path("data") / dataset / "meta.pkl", Path("data") / dataset / "meta.json")
                 if f.is_file()), None)


def _tokenizer_meta_in(file: Path) -> dict:
    """The tokenizer a meta.json or meta.pkl describes. A meta.pkl is read as plain data only: unpickling
    it cannot run code, as torch.load of an untrusted file could."""
    try:
        meta = read_meta(file.parent)  # prefers a meta.json beside a meta.pkl: gptrain's record of the same data
    except (DataError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(meta, dict) or "tokenizer" not in meta:
        raise CheckpointError(f"{file} describes no tokenizer (no 'itos' table, no 'tokenizer' entry)")
    return meta["tokenizer"]
