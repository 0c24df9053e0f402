"""Sampling: what `gptrain generate`, the server's decode loop and training's samples all draw tokens with.

The filters (temperature, top-k, nucleus), one random stream per row so a sample reads the same alone or
in a batch, batched decoding with the KV cache, and turning tokens into text as they arrive.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

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
    choice = inverse_cdf(probs, uniforms(len(probs), generators, probs.device))
    return choice if ids is None else ids.gather(-1, choice)


def uniforms(n: int, generators: Sequence[torch.Generator] | None, device: torch.device) -> torch.Tensor:
    """(n, 1) uniform draws from [0, 1): one from each row's own generator (a tiny op each, on the
    generator's device, so nothing waits for the GPU), or all from torch's global one."""
    if generators is None:
        return torch.rand(n, 1, device=device)
    assert len(generators) == n, f"{len(generators)} generators for {n} rows"
    return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators]).to(device)[:, None]


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row of (B, V) probabilities, the first token whose cumulative probability passes u times
    the row's total: a draw from the row, for all rows in one vectorised search. A token of probability 0
    is never drawn."""
    cdf = probs.cumsum(dim=-1)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # u < 1, yet u times the total can round up to the total: stay at the last token with any probability
    last = probs.size(-1) - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1, keepdim=True)
    return torch.minimum(choice, last)


def mask_padding(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Never sample the embedding's padding: ids past the tokenizer's vocabulary, which no text encodes to
    (the vocabulary is rounded up to a multiple of 64 for speed). In place; returns `logits`."""
    if vocab_size is not None:
        logits[..., vocab_size:] = float("-inf")
    return logits


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
        token = sample_next(mask_padding(logits[:, -1, :], vocab_limit), temperature, top_k, top_p, generators)
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
