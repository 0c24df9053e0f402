"""Continuous batching: unrelated completions decode together, one forward pass per token for all of them.

A server's requests arrive at any time, with their own prompts, lengths and sampling settings. One
background thread owns the model and loops: it admits waiting requests between decode steps (each
prefilled alone, then copied into a free row of a shared KV cache), runs one forward for every active
row, samples each row with its own settings and random stream, and hands each token to its request's
callback. Finished, stopped and cancelled rows leave at once, so a long request never holds up short ones
for its whole length. Rows hold different numbers of tokens: each decodes at its own position, and an
attention mask hides the cache past each row's end, so a row reads the same as it would alone. A request
whose prefill fails (out of memory on a long prompt, say) fails alone; a failed decode step fails the
rows in it; either way the engine carries on with the next requests.
"""

from __future__ import annotations

import collections
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptrain.device import autocast
from gptrain.model import GPT, KVCache
from gptrain.sampling import StreamDecoder, mask_padding, sample_next


@dataclass(frozen=True)
class Sampling:
    """How one sequence is sampled and when it ends."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None = the whole vocabulary
    top_p: float | None = None  # None = no nucleus filter
    max_tokens: int = 16
    stop: tuple[str, ...] = ()  # text that ends the sequence; it is not part of the result
    logprobs: int | None = None  # report each token's log-probability and the `logprobs` most likely
    echo_logprobs: bool = False  # also the prompt tokens' log-probabilities (lm-evaluation-harness scoring)


@dataclass
class Token:
    """A generated token and the text it released: possibly none, while a character or a possible stop
    sequence is incomplete. `logprob` and `top` are filled when the sequence asked for log-probabilities."""

    id: int
    text: str
    logprob: float | None = None
    top: dict[str, float] | None = None


@dataclass
class PromptLogprobs:
    """Log-probabilities of the prompt tokens, the first one's None (nothing precedes it)."""

    logprobs: list[float | None]
    top: list[dict[str, float] | None]


@dataclass
class Finish:
    """The end of a sequence: `reason` is "length", "stop" (a stop sequence or end-of-text) or "error"."""

    reason: str
    error: str | None = None


Event = Token | PromptLogprobs | Finish


@dataclass(eq=False)
class Request:
    """One completion: a prompt, its settings and random stream; the engine reports to `emit` from its thread."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    generator: torch.Generator | None = None  # None: greedy
    cancelled: bool = False  # set from any thread; the engine drops the request before its next step
    finished: bool = False  # its Finish has been emitted: nothing more may follow
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # generated text so far, stop sequences not yet cut
    sent: int = 0  # how much of `text` has been emitted
    decoder: StreamDecoder | None = None  # made by the engine, which knows the tokenizer

    def release(self, finished: bool) -> tuple[str, bool]:
        """The text that can go out now, and whether a stop sequence ended the sequence. Until the end, text
        that could still become a stop sequence is held back, so streamed and whole results read alike."""
        stops = self.sampling.stop
        # a stop sequence cannot start in text already sent: that text never ended in the beginning of one
        hits = [i for i in (self.text.find(s, self.sent) for s in stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        elif finished:
            end, stopped = len(self.text), False
        else:
            held = max((n for s in stops for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
            end, stopped = len(self.text) - held, False
        out, self.sent = self.text[self.sent:end], end
        return out, stopped

    def finish(self, reason: str, error: str | None = None) -> None:
        """Emit the request's end: no event may follow it."""
        self.finished = True
        self.emit(Finish(reason, error))


class RowCache(KVCache):
    """KV buffers for up to `rows` sequences that hold different numbers of tokens; the first B rows are the
    active ones. Each new token is written at its own row's end, and the mask lets each row see only its own."""

    def __init__(self, model: GPT, rows: int):
        super().__init__(model.config)
        self.rows = rows
        self.lengths = torch.zeros(rows, dtype=torch.long, device=model.lm_head.weight.device)

    def store(self, row: int, prefill: KVCache) -> None:
        """Copy a prompt prefilled alone into `row`."""
        for layer, (k, v) in enumerate(zip(prefill.keys, prefill.values)):
            if self.keys[layer] is None:  # allocated at first use, in the dtype autocast gave the keys
                shape = (self.rows, k.size(1), self.block_size, k.size(3))
                # zeros, not garbage: a masked-out NaN would still poison attention (0 * NaN is NaN)
                self.keys[layer], self.values[layer] = k.new_zeros(shape), v.new_zeros(shape)
            self.keys[layer][row, :, :prefill.length] = k[0, :, :prefill.length]
            self.values[layer][row, :, :prefill.length] = v[0, :, :prefill.length]
        self.lengths[row] = prefill.length

    def move(self, source: int, target: int) -> None:
        """Row `source` takes over row `target` (whose sequence has left), keeping the active rows first."""
        n = int(self.lengths[source])
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :n] = keys[source, :, :n]
            values[target, :, :n] = values[source, :, :n]
        self.lengths[target] = self.lengths[source]

    def begin_step(self, batch: int) -> None:
        """The mask for one new token in each of the first `batch` rows: each row sees its own tokens only."""
        lengths = self.lengths[:batch]
        self.batch = batch
        self.span = int(lengths.max()) + 1  # the keys any row reads this step, its new one included
        self.mask = (torch.arange(self.span, device=lengths.device) <= lengths[:, None])[:, None, None, :]

    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        """Each row's new token sits at its own row's end: (batch, 1)."""
        assert new == 1 and self.span <= self.block_size, "after its prefill a row grows one token at a time"
        return self.lengths[:self.batch, None]

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        rows = torch.arange(self.batch, device=k.device)
        self.keys[layer][rows, :, self.lengths[:self.batch]] = k[:, :, 0]
        self.values[layer][rows, :, self.lengths[:self.batch]] = v[:, :, 0]
        return self.keys[layer][:self.batch, :, :self.span], self.values[layer][:self.batch, :, :self.span], self.mask, False

    def advance(self, new: int) -> None:
        self.lengths[:self.batch] += new


class Engine:
    """Owns the model on one background thread and decodes every submitted request, up to `max_batch_size`
    rows at a time. Prompts must leave room for their max_tokens within the context: the caller checks."""

    def __init__(self, model: GPT, tokenizer, *, max_batch_size: int, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.device, self.dtype = device, dtype
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Request] = []  # row i of the cache holds rows[i]
        self.cache = RowCache(model, max_batch_size)
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="gptrain-decode", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join()

    def submit(self, requests: list[Request]) -> None:
        block_size = self.model.config.block_size
        assert all(len(s.prompt) + s.sampling.max_tokens <= block_size for s in requests), "no room to generate"
        with self.wakeup:
            self.waiting.extend(requests)
            self.wakeup.notify()

    def _run(self) -> None:
        with torch.inference_mode(), autocast(self.device, self.dtype):
            while True:
                with self.wakeup:
                    while not (self.stopping or self.waiting or self.rows):
                        self.wakeup.wait()
                    if self.stopping:
                        return
                    free = self.max_batch_size - len(self.rows)
                    admitted = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
                prefills: dict[tuple, tuple | Exception] = {}  # the n samples of one prompt share its prefill
                for request in admitted:
                    try:
                        self._admit(request, prefills)
                    except Exception as e:  # out of memory on a long prompt, say: only this request fails
                        self._fail([request], e)
                try:
                    self._decode()
                except Exception as e:  # a bug or out of memory: fail the rows still decoding, keep serving
                    self._fail(self.rows, e)
                    self.rows, self.cache = [], RowCache(self.model, self.max_batch_size)

    def _fail(self, requests: list[Request], error: Exception) -> None:
        traceback.print_exception(error)
        for request in requests:
            if not request.finished:  # a row can finish in the step that then fails
                request.finish("error", f"{type(error).__name__}: {error}")

    def _admit(self, request: Request, prefills: dict[tuple, tuple | Exception]) -> None:
        """Prefill a new request, sample its first token, and give it a row unless that token finished it."""
        if request.cancelled:
            return
        key = (tuple(request.prompt), request.sampling.logprobs if request.sampling.echo_logprobs else None)
        if key not in prefills:
            try:
                prefills[key] = self._prefill(request)
            except Exception as e:
                prefills[key] = e  # the other samples of this prompt fail alike, without trying again
        if isinstance(prefills[key], Exception):
            raise prefills[key]
        cache, logits, prompt_logprobs = prefills[key]
        request.decoder = StreamDecoder(self.tokenizer)
        if prompt_logprobs is not None:
            request.emit(prompt_logprobs)
        if request.sampling.max_tokens == 0:
            request.finish("length")
            return
        token = self._sample(logits[None], [request])[0]
        if not self._accept(request, token, logits):
            self.cache.store(len(self.rows), cache)
            self.rows.append(request)

    def _decode(self) -> None:
        """Decode one token for every active row."""
        self._drop([i for i, request in enumerate(self.rows) if request.cancelled])
        if not self.rows:
            return
        batch = len(self.rows)
        self.cache.begin_step(batch)
        inputs = torch.tensor([request.tokens[-1] for request in self.rows], device=self.device)[:, None]
        logits, _ = self.model(inputs, cache=self.cache)
        logits = mask_padding(logits[:, -1, :], self.tokenizer.vocab_size)
        tokens = self._sample(logits, self.rows)
        self._drop([i for i, (request, token) in enumerate(zip(self.rows, tokens))
                    if self._accept(request, token, logits[i])])

    def _prefill(self, request: Request) -> tuple[KVCache, torch.Tensor, PromptLogprobs | None]:
        """Run a prompt alone: its cache, the logits of its next token, and, when asked, its tokens' logprobs."""
        cache = KVCache(self.model.config)
        ids = torch.tensor([request.prompt], device=self.device)
        if not request.sampling.echo_logprobs:
            logits, _ = self.model(ids, cache=cache)
            return cache, mask_padding(logits[0, -1], self.tokenizer.vocab_size), None
        # targets make the model return every position's logits; the loss that comes with them is not used
        targets = torch.tensor([request.prompt[1:] + [-1]], device=self.device)
        logits, _ = self.model(ids, targets, cache=cache)
        logits = mask_padding(logits[0], self.tokenizer.vocab_size)
        logprobs, top = [None], [None]
        for position, token in enumerate(request.prompt[1:]):
            logprob, best = self._logprobs(logits[position], token, request.sampling.logprobs)
            logprobs.append(logprob)
            top.append(best)
        return cache, logits[-1], PromptLogprobs(logprobs, top)

    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        """One token per row; rows that share their settings are sampled together, each from its own stream."""
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, request in enumerate(rows):
            s = request.sampling
            groups[(s.temperature, s.top_k, s.top_p)].append(i)
        tokens = [0] * len(rows)
        for (temperature, top_k, top_p), members in groups.items():
            generators = [rows[i].generator for i in members] if temperature > 0 else None
            chosen = sample_next(logits[members], temperature, top_k, top_p, generators)
            for i, token in zip(members, chosen[:, 0].tolist()):
                tokens[i] = token
        return tokens

    def _logprobs(self, logits: torch.Tensor, token: int, n: int | None) -> tuple[float, dict[str, float]]:
        """The model's log-probability of `token`, and the n most likely tokens' (the token's own included)."""
        logprobs, top = torch.log_softmax(logits.float(), dim=-1), {}
        if n:
            values, ids = torch.topk(logprobs, n)
            top = {self.tokenizer.decode([i]): v for i, v in zip(ids.tolist(), values.tolist())}
        top[self.tokenizer.decode([token])] = logprobs[token].item()
        return logprobs[token].item(), top

    def _accept(self, request: Request, token: int, logits: torch.Tensor) -> bool:
        """Record a sampled token and emit what it released; return whether the sequence is finished."""
        request.tokens.append(token)
        logprob = top = None
        if request.sampling.logprobs is not None:
            logprob, top = self._logprobs(logits, token, request.sampling.logprobs)
        end_of_text = token == self.tokenizer.eot_id
        if not end_of_text:
            request.text += request.decoder.push(token)
        finished = end_of_text or len(request.tokens) >= request.sampling.max_tokens
        if finished:
            request.text += request.decoder.flush()
        text, stopped = request.release(finished)
        request.emit(Token(token, text, logprob, top))
        if stopped or end_of_text:
            request.finish("stop")
        elif finished:
            request.finish("length")
        return finished or stopped

    def _drop(self, finished: list[int]) -> None:
        """Free the rows of finished sequences, moving the last rows into the gaps."""
        for i in sorted(finished, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self.cache.move(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
