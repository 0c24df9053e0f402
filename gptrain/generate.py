"""Sample text from a checkpoint with the KV cache, several samples together as the rows of one batch.

One sample streams to stdout as it is produced; several are printed each in full when all are done.

Usage: gptrain generate --model_path checkpoints/ckpt.pt --prompt "..." [--max_new_tokens N] ...
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gptrain import tokenizer as tokenizers
from gptrain.checkpoint import CheckpointError, load_checkpoint, load_weights, model_config_from
from gptrain.config import DTYPE_NAMES, ConfigError
from gptrain.data import DataError, read_meta
from gptrain.device import autocast, resolve_device, resolve_dtype
from gptrain.errors import command, not_utf8
from gptrain.model import GPT, KVCache


def nucleus(logits: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the nucleus: the smallest set of most likely tokens whose
    probabilities sum to at least top_p (the most likely token always stays)."""
    if top_p is None or not 0.0 < top_p < 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    outside = mass_before >= top_p
    outside[..., 0] = False  # the most likely stays, even where a tiny top_p rounds to 0 in this dtype
    sorted_logits.masked_fill_(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_generators(n: int, seed: int | None, device: torch.device) -> list[torch.Generator]:
    """One random stream per sample. Sample i's is seeded by the i-th child of numpy's SeedSequence(seed),
    which does not depend on n: a sample reads the same whether it is drawn alone or in a batch of 16
    (up to floating-point rounding, which the batch size can change, notably on GPUs).
    Without a seed the root comes from OS entropy, so runs and samples all differ."""
    children = np.random.SeedSequence(seed).spawn(n)
    return [torch.Generator(device=device).manual_seed(int(c.generate_state(1, np.uint64)[0])) for c in children]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """The next token for each row of (B, vocab) logits, as (B, 1): greedy at temperature 0, else drawn
    among the top_k most likely tokens (all for None or 0), then among those in the top_p nucleus.

    With `generators`, row i draws from generators[i] only, so its tokens do not depend on the other
    rows; without, all rows draw from torch's global generator.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    ids = None
    if top_k is not None and 0 < top_k < logits.size(-1):
        # keep only the k candidates: the rest of the work then costs O(k) per row, not O(vocabulary)
        logits, ids = torch.topk(logits, top_k, dim=-1)
    probs = torch.softmax(nucleus(logits.float() / temperature, top_p), dim=-1)
    if generators is None:
        choice = torch.multinomial(probs, num_samples=1)
    else:
        assert len(generators) == len(probs), f"{len(generators)} generators for {len(probs)} rows"
        choice = torch.stack([torch.multinomial(row, num_samples=1, generator=g) for row, g in zip(probs, generators)])
    return choice if ids is None else ids.gather(-1, choice)


@torch.no_grad()
def generate_tokens(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    generators: Sequence[torch.Generator] | None = None, use_cache: bool = True,
                    vocab_limit: int | None = None) -> Iterator[torch.Tensor]:
    """Yield (B, 1) new tokens, one for each row of the (B, T) prompt, conditioning on at most the last
    block_size tokens. The rows share every forward pass, so the weights are read once per step for all.

    With the cache each step feeds only the newest token. Once the context is full, positions shift
    with every token, so the last block_size tokens are recomputed: exactly what the uncached path does.
    """
    block_size = model.config.block_size
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block_size:])
        elif cache is None or cache.length >= block_size:
            cache = KVCache(model.config)
            logits, _ = model(idx[:, -block_size:], cache=cache)
        else:
            logits, _ = model(idx[:, -1:], cache=cache)
        logits = logits[:, -1, :]
        if vocab_limit is not None:  # the embedding is padded past the tokenizer's vocabulary
            logits[:, vocab_limit:] = float("-inf")
        token = sample_next(logits, temperature, top_k, top_p, generators)
        idx = torch.cat([idx, token], dim=1)
        yield token


class StreamDecoder:
    """Turns tokens into text as they arrive.

    Tokens are decoded together, not one by one: a byte-level token can end inside a UTF-8 character,
    and SentencePiece-style decoders drop the leading space of a token decoded alone. Each call returns
    what the text gained; a line break starts a fresh segment, so the work per token stays small.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.segment, self.printed = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.segment.append(token)
        text = self.tokenizer.decode(self.segment)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the rest of its bytes
            return ""
        new, self.printed = text[self.printed:], len(text)
        if text.endswith("\n"):
            self.segment, self.printed = [], 0
        return new

    def flush(self) -> str:
        """Whatever is still held back (bytes of a character the sample ended inside)."""
        return self.tokenizer.decode(self.segment)[self.printed:] if self.segment else ""


def decode(tokenizer, tokens: list[int]) -> str:
    """The text that streaming `tokens` prints, so a sample reads the same in a batch as alone."""
    decoder = StreamDecoder(tokenizer)
    return "".join(decoder.push(t) for t in tokens) + decoder.flush()


def vocabulary_file(checkpoint: dict, meta_path: str | Path | None) -> Path | None:
    """Where the vocabulary of a checkpoint that records no tokenizer lives: --meta (a meta.pkl or
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
    dataset = (checkpoint.get("config") or {}).get("dataset")
    if not isinstance(dataset, str) or not dataset:
        return None
    return next((f for f in (Path("data") / dataset / "meta.pkl", Path("data") / dataset / "meta.json")
                 if f.is_file()), None)


def tokenizer_meta_in(file: Path) -> dict:
    """The tokenizer a meta.json or meta.pkl describes. A meta.pkl is read as plain data only: unpickling
    it cannot run code, as torch.load of an untrusted file could."""
    try:
        meta = read_meta(file.parent)  # prefers a meta.json beside a meta.pkl: gptrain's record of the same data
    except (DataError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(meta, dict) or "tokenizer" not in meta:
        raise CheckpointError(f"{file} describes no tokenizer (no 'itos' table, no 'tokenizer' entry)")
    return meta["tokenizer"]


def load_model(path: str | Path, device: torch.device, meta_path: str | Path | None = None) -> tuple[GPT, object]:
    """The model in eval mode and the tokenizer it was trained with: the one the checkpoint records, or
    the vocabulary in --meta, or for a nanoGPT checkpoint its dataset's meta.pkl, or else GPT-2's."""
    checkpoint = load_checkpoint(path, map_location=device)
    model = GPT(model_config_from(checkpoint, dropout=0.0)).to(device)
    load_weights(model, checkpoint, path)
    model.eval()
    meta = checkpoint.get("tokenizer")
    file = vocabulary_file(checkpoint, meta_path) if meta is None or meta_path is not None else None
    if file is not None:
        meta = tokenizer_meta_in(file)
        print(f"note: using the '{meta['name']}' tokenizer of {file}", file=sys.stderr)
    elif meta is None:  # e.g. a nanoGPT checkpoint of a GPT-2-tokenized dataset: the only safe guess
        if model.config.vocab_size < tokenizers.GPT2Tokenizer.vocab_size:
            raise CheckpointError(f"{path} records no tokenizer and its vocabulary is too small for GPT-2's; "
                                  f"give the vocabulary it was trained with: --meta data/DATASET/meta.pkl")
        print("note: the checkpoint records no tokenizer; using GPT-2's", file=sys.stderr)
        meta = {"name": "gpt2"}
    tokenizer = tokenizers.from_meta(meta)
    if tokenizer.vocab_size > model.config.vocab_size:
        source = file or path
        raise CheckpointError(f"the tokenizer of {source} has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size {model.config.vocab_size}: not the vocabulary it was trained with")
    return model, tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptrain generate", description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="checkpoints/ckpt.pt", help="checkpoint to sample from")
    p.add_argument("--meta", default=None,
                   help="vocabulary for a checkpoint that records none (nanoGPT's): a meta.pkl or meta.json, or "
                        "the data directory holding one; default data/<its dataset>/meta.pkl if present")
    p.add_argument("--prompt", default="\n", help="text to continue, or FILE:path to read it from a file")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; <1 sharper, >1 more random")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: smallest set with this much probability")
    p.add_argument("--num_samples", type=int, default=1, help="independent samples, decoded together in one batch")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for reproducible sampling; sample i has its own stream, the same for any --num_samples")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help="precision; auto: bfloat16 on recent GPUs")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context every token (slow; for checks)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Every bad setting at once, each named with the value given. Each test is written to fail for NaN too
    (`nan < 0` is false), since argparse turns 'nan' into a float."""
    problems = []
    if not args.max_new_tokens >= 0:
        problems.append(f"--max_new_tokens must be >= 0 (got {args.max_new_tokens})")
    if not args.num_samples >= 1:
        problems.append(f"--num_samples must be >= 1 (got {args.num_samples})")
    if not 0 <= args.temperature < float("inf"):
        problems.append(f"--temperature must be >= 0 and finite, 0 for greedy (got {args.temperature})")
    if not args.top_k >= 0:
        problems.append(f"--top_k must be >= 0, 0 for all tokens (got {args.top_k})")
    if not 0 < args.top_p <= 1:
        problems.append(f"need 0 < --top_p <= 1, 1 for all tokens (got {args.top_p})")
    if args.seed is not None and not args.seed >= 0:
        problems.append(f"--seed must be >= 0 (got {args.seed})")
    if problems:
        raise ConfigError("; ".join(problems))


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _check_args(args)
    prompt = args.prompt
    if prompt.startswith("FILE:"):  # read before the checkpoint, so that a bad file stops the command at once
        path = Path(prompt[5:])
        if not path.is_file():
            raise ConfigError(f"--prompt FILE:{path}: no such file")
        try:
            prompt = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(not_utf8(f"--prompt FILE:{path}", e)) from None
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model_path, device, args.meta)
    ids = tokenizer.encode(prompt) or ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
    if not ids:
        raise ConfigError("the prompt is empty and the tokenizer has no end-of-text token to start from; give --prompt")
    n = args.num_samples
    with autocast(device, resolve_dtype(args.dtype, device)):
        tokens = generate_tokens(
            model, torch.tensor([ids] * n, dtype=torch.long, device=device), args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
            generators=sample_generators(n, args.seed, device) if args.temperature > 0 else None,
            use_cache=not args.no_cache, vocab_limit=tokenizer.vocab_size,
        )
        if n == 1:
            decoder = StreamDecoder(tokenizer)
            for token in tokens:
                print(decoder.push(token.item()), end="", flush=True)
            print(decoder.flush(), flush=True)
        else:  # a bar on a terminal only, so piped output holds nothing but the samples; it clears when done
            steps = tqdm(tokens, desc=f"{n} samples", total=args.max_new_tokens, unit="tok", leave=False,
                         disable=not sys.stderr.isatty())
            rows = torch.cat([torch.empty(n, 0, dtype=torch.long, device=device), *steps], dim=1).tolist()
            print(("\n" + "-" * 40 + "\n").join(decode(tokenizer, row) for row in rows), flush=True)


if __name__ == "__main__":
    main()
