"""Token memmaps written by `gptrain prepare`, and the sampler that draws training windows from them."""

from __future__ import annotations

import json
import mmap
import os
import pickle
import sys
import weakref
from pathlib import Path

import numpy as np
import torch

from gptrain.errors import UserError
from gptrain.tokenizer import GPT2Tokenizer


# without a recorded max_id, the ids are checked on this many blocks of this many tokens, spread over the file
SAMPLE_BLOCKS, SAMPLE_BLOCK = 64, 1 << 18


class DataError(UserError):
    """Missing or unusable prepared data; the message says what to run."""


class _PlainUnpickler(pickle.Unpickler):
    """Reads nanoGPT-style meta.pkl files without running code from them: plain containers only."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}; only plain data is accepted")


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared data directory; for one prepared by nanoGPT, what its files imply."""
    data_dir = Path(data_dir)
    if (data_dir / "meta.json").is_file():
        return json.loads((data_dir / "meta.json").read_text())
    if (data_dir / "meta.pkl").is_file():
        with open(data_dir / "meta.pkl", "rb") as f:
            meta = _PlainUnpickler(f).load()
        if "tokenizer" not in meta and "itos" in meta:  # nanoGPT's character-level datasets
            meta["tokenizer"] = {"name": "char", "chars": "".join(meta["itos"][i] for i in range(len(meta["itos"])))}
        return meta
    if (data_dir / "train.bin").is_file():  # nanoGPT writes no metadata for its GPT-2 datasets
        print(f"note: {data_dir} has no meta.json; reading it as GPT-2 tokens (uint16)", file=sys.stderr)
        gpt2 = GPT2Tokenizer  # its class attributes: building the BPE itself is not needed here
        return {"vocab_size": gpt2.vocab_size, "dtype": "uint16", "tokenizer": {"name": gpt2.name}, "eot_id": gpt2.eot_id}
    raise DataError(f"no meta.json in {data_dir}: run `gptrain prepare --out_dir {data_dir} ...` first")


def open_tokens(data_dir: str | Path, split: str, meta: dict) -> np.memmap:
    """A split's tokens, checked against its metadata: its length, and no id outside the vocabulary (which
    would index past the embedding: on a GPU, a device-side assert far from its cause)."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} not found: run `gptrain prepare --out_dir {data_dir} ...` first")
    dtype = np.dtype(meta.get("dtype", "uint16"))
    if path.stat().st_size % dtype.itemsize or not path.stat().st_size:
        raise DataError(f"{path} holds {path.stat().st_size:,} bytes, not a whole number (> 0) of {dtype} tokens as its "
                        f"metadata says; prepare it again")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    split_meta = meta.get(split, {})
    expected = split_meta.get("tokens")
    if expected is not None and len(tokens) != expected:  # truncated, or overwritten by another run
        raise DataError(f"{path} holds {len(tokens):,} tokens but meta.json says {expected:,}; prepare it again")
    largest = split_meta.get("max_id")
    if largest is None:  # prepared by nanoGPT, or by gptrain before it recorded max_id
        starts = np.unique(np.linspace(0, max(len(tokens) - SAMPLE_BLOCK, 0), SAMPLE_BLOCKS, dtype=np.int64))
        largest = max(int(tokens[start:start + SAMPLE_BLOCK].max()) for start in starts)
    if largest >= meta["vocab_size"]:
        raise DataError(f"{path} holds token id {largest:,}, outside its vocabulary of {meta['vocab_size']:,}: it was "
                        f"tokenized with another tokenizer than its metadata names, or is corrupt; prepare it again")
    return tokens


class TokenReader:
    """Reads tokens from a file `open_tokens` opened with `os.pread`, not through its memmap: pages read
    through a mapping stay mapped and count in the process's RSS, which over a long run of random windows
    (or one pass over a large split) climbs towards the size of the file (17 GB for OpenWebText). Pages read
    with pread only sit in the page cache, shared and reclaimable. The memmap still gives the length and
    dtype. An array in memory, a view of a memmap, or Windows (no pread) is indexed instead."""

    def __init__(self, tokens: np.ndarray):
        self.tokens, self._fd = tokens, None
        # a whole file's mapping, not a view of one
        if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap) and hasattr(os, "pread"):
            self._fd = os.open(tokens.filename, os.O_RDONLY)
            weakref.finalize(self, os.close, self._fd)

    def read(self, start: int, count: int) -> np.ndarray:
        """tokens[start:start + count]."""
        if self._fd is None:
            return np.asarray(self.tokens[start:start + count])
        itemsize = self.tokens.itemsize
        return np.frombuffer(os.pread(self._fd, count * itemsize, self.tokens.offset + start * itemsize), self.tokens.dtype)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """The windows of `length` tokens at `starts`, one row each."""
        if self._fd is None:
            return self.tokens[starts[:, None] + np.arange(length)]
        return np.stack([self.read(start, length) for start in starts.tolist()])


class BatchSampler:
    """Random `block_size` windows from a token file.

    Sequence j of optimizer step `step` is a pure function of (seed, step, j), and micro-batch `index`
    holds sequences index * batch_size onwards, whichever process draws it: a run on any number of
    processes, with any micro-batch, sees the same data, and the step number alone is the data position
    that a checkpoint needs to replay it.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        if len(tokens) <= block_size:
            where = tokens.filename if isinstance(tokens, np.memmap) else "the data"
            raise DataError(f"{where} holds {len(tokens):,} tokens, too few for block_size {block_size} (a window is "
                            f"block_size + 1 tokens); give more text or a smaller block_size")
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.reader = TokenReader(tokens)

    def batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, both (batch_size, block_size) int64 on the CPU."""
        # Each step draws one stream of window starts; micro-batch `index` takes its batch_size of them in
        # turn, so the step's sequences are the same whatever the micro-batch (a prefix of a longer draw
        # equals the shorter draw).
        rng = np.random.default_rng([self.seed, step])
        first = index * self.batch_size
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=first + self.batch_size)[first:]
        windows = torch.from_numpy(self.reader.windows(starts, self.block_size + 1).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Move a batch to `device`; on CUDA through pinned memory, so the copy overlaps with compute."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)
