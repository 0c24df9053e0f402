"""Loss, perplexity and bits per byte of a checkpoint over a whole split; and training's loss estimates.

`gptrain eval` predicts every token of the split once, in order, each from the tokens before it in its
block_size window, so its figure is the split's own, not an estimate from random windows as during
training. Bits per byte divide out the tokenizer, so models with different tokenizers compare.

Usage: gptrain eval --model_path checkpoints/ckpt.pt [--split val] [--max_tokens N] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from gptrain.checkpoint import Checkpoint, CheckpointError, load_model
from gptrain.config import DTYPE_NAMES, ConfigError
from gptrain.data import BatchSampler, DataError, TokenReader, open_tokens, read_meta, to_device
from gptrain.device import autocast, resolve_device, resolve_dtype
from gptrain.distributed import DistInfo, sum_across_ranks
from gptrain.errors import command
from gptrain.metrics import bits_per_byte


@torch.no_grad()
def estimate_loss(model: nn.Module, sampler: BatchSampler, iters: int, device: torch.device,
                  autocast: AbstractContextManager, info: DistInfo) -> float:
    """Mean loss over the sampler's batches 0 .. iters-1, the same on every world size: rank r of W
    takes batches r, r+W, ... and the sums are all-reduced. Every evaluation sees the same batches,
    so successive figures compare like with like."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    rounds = -(-iters // info.world_size)
    for i in range(rounds):
        index = info.rank + i * info.world_size
        # Every rank runs as many forwards as the busiest one (FSDP gathers weights collectively);
        # a rank past the last batch repeats one and leaves it out of the sum.
        x, y = to_device(sampler.batch(0, min(index, iters - 1)), device)
        with autocast:
            _, loss = model(x, y)
        if index < iters:
            total += loss.float()
    model.train(was_training)
    return sum_across_ranks(total, info).item() / iters


@torch.no_grad()
def evaluate_tokens(model: nn.Module, tokens: np.ndarray, *, block_size: int, batch_size: int,
                    device: torch.device, autocast: AbstractContextManager, max_tokens: int | None = None,
                    progress: bool = False) -> tuple[float, int]:
    """Mean loss (nats per token) over `tokens` in order, and how many tokens it predicted.

    Every token after the first is predicted exactly once, from the tokens before it in its window:
    window i feeds tokens [i*B, i*B + B) and predicts [i*B + 1, i*B + B + 1) for B = block_size, so the
    windows do not overlap and the last one is shorter. `max_tokens` caps the predictions, from the start.
    A batch holding the short last window pads it with targets of -1, which cross_entropy ignores; the
    model is causal, so the padding changes nothing before it.
    """
    predicted = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    if predicted < 1:
        raise DataError(f"nothing to evaluate: {len(tokens)} tokens, max_tokens {max_tokens}")
    starts = range(0, predicted, block_size)
    reader = TokenReader(tokens)  # pread: a pass over a large split leaves no pages mapped in the process
    was_training = model.training
    model.eval()
    total = 0.0
    bar = tqdm(total=predicted, unit="tok", leave=False, disable=not (progress and sys.stderr.isatty()))
    for first in range(0, len(starts), batch_size):
        batch = starts[first:first + batch_size]
        width = min(block_size, predicted - batch[0])  # only the last window can be shorter
        # the batch's windows are consecutive: one read covers them all, each window's last token included
        span = torch.from_numpy(reader.read(batch[0], min(batch[-1] + block_size, predicted) + 1 - batch[0]).astype(np.int64))
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -1, dtype=torch.long)
        for row, start in enumerate(batch):
            n = min(block_size, predicted - start)
            window = span[start - batch[0]:start - batch[0] + n + 1]
            x[row, :n], y[row, :n] = window[:-1], window[1:]
        counted = int((y >= 0).sum())
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, _ = model(x, y)  # with targets the model returns every position's logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum")
        # summed in a Python float (double): float32 would lose digits over a split of many millions of
        # tokens. .item() is a CPU-GPU sync point per batch, negligible next to a forward pass.
        total += loss.item()
        bar.update(counted)
    bar.close()
    model.train(was_training)
    return total / predicted, predicted


def perplexity(mean_loss: float) -> float:
    """exp of the mean loss: the number of equally likely tokens the model is as unsure as."""
    return math.exp(mean_loss) if mean_loss < 700 else math.inf  # exp overflows past ~709


def split_bits_per_byte(mean_loss: float, tokens: int, split_meta: dict) -> float | None:
    """Bits per byte of `tokens` predicted tokens of a split whose meta.json entry records its `tokens`
    and `text_bytes`. When only part of the split is evaluated, its tokens are taken to cover bytes in
    the split's average proportion; over the whole split the figure is exact. None without text_bytes."""
    text_bytes, split_tokens = split_meta.get("text_bytes"), split_meta.get("tokens")
    if not text_bytes or not split_tokens:
        return None
    return bits_per_byte(mean_loss, tokens, text_bytes * tokens / split_tokens)


def _describe(tokenizer: dict) -> str:
    name = tokenizer.get("name", "?")
    return f"'char' ({len(tokenizer.get('chars', ''))} characters)" if name == "char" else f"'{name}'"


def check_tokenizer(data_dir: str | Path, meta: dict, checkpoint: Checkpoint) -> None:
    """DataError when the data was tokenized otherwise than the model was trained: its losses would be
    of a model reading the wrong ids. Skipped when either side records no tokenizer."""
    data, model = meta.get("tokenizer"), checkpoint.record.tokenizer
    if data and model and data != model:
        theirs, ours = _describe(data), _describe(model)
        if theirs == ours:
            theirs, ours = f"{theirs} with one vocabulary", f"another {ours} one"
        raise DataError(f"{data_dir} was tokenized with {theirs} but the checkpoint was trained with {ours}; "
                        f"evaluate on data prepared with the checkpoint's tokenizer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptrain eval", description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="checkpoints/ckpt.pt", help="checkpoint to evaluate")
    p.add_argument("--data_dir", default=None, help="prepared data directory; default: the one the checkpoint trained on")
    p.add_argument("--split", default="val", choices=("train", "val"), help="which split to evaluate, whole")
    p.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N predicted tokens")
    p.add_argument("--batch_size", type=int, default=16, help="windows of block_size tokens per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help="precision; auto: bfloat16 on recent GPUs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line of text")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or (args.max_tokens is not None and args.max_tokens < 1):
        raise ConfigError("--batch_size and --max_tokens must be >= 1")
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.model_path, device=device)
    data_dir = args.data_dir or checkpoint.record.config.get("data_dir")
    if not data_dir:
        raise CheckpointError(f"{args.model_path} does not record its data_dir; give --data_dir")
    meta = read_meta(data_dir)
    check_tokenizer(data_dir, meta, checkpoint)
    if meta.get("vocab_size", 0) > model.config.vocab_size:
        raise DataError(f"{data_dir} has a vocabulary of {meta['vocab_size']:,} tokens, more than the model's "
                        f"{model.config.vocab_size:,}")
    tokens = open_tokens(data_dir, args.split, meta)
    loss, count = evaluate_tokens(model, tokens, block_size=model.config.block_size, batch_size=args.batch_size,
                                  device=device, autocast=autocast(device, resolve_dtype(args.dtype, device)),
                                  max_tokens=args.max_tokens, progress=True)
    bpb = split_bits_per_byte(loss, count, meta.get(args.split, {}))
    if bpb is None:
        print(f"note: {data_dir} records no text_bytes for '{args.split}' (prepared by nanoGPT?), so no bits per "
              f"byte; `gptrain prepare` records them", file=sys.stderr)
    if args.json:
        print(json.dumps({"split": args.split, "tokens": count, "loss": loss, "perplexity": perplexity(loss),
                          "bits_per_byte": bpb, "data_dir": str(data_dir), "model_path": str(args.model_path)}))
    else:
        bpb_text = f"{bpb:.3f} bits per byte" if bpb is not None else "bits per byte unknown"
        print(f"{args.split}: {count:,} tokens | loss {loss:.4f} | perplexity {perplexity(loss):.2f} | {bpb_text}")


if __name__ == "__main__":
    main()
