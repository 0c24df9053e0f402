"""Continuous batching: unrelated completions decode together, one forward pass per token for all of them.

A server's requests arrive at any time, with their own prompts, lengths and sampling settings. One
background thread owns the model and loops. Each step it admits waiting requests while rows are free;
feeds their prompts to the model, `prefill_chunk` tokens a step at most, so that a long prompt delays
the rows already decoding by one chunk per step, never by its whole length; then runs one forward for
every decoding row, samples each row with its own settings and random stream, and hands each token to
its request's callback. Finished, stopped and cancelled rows leave at once, so a long request never holds
up short ones for its whole length. Rows hold different numbers of tokens: each decodes at its own
position, and a mask hides the cache past each row's end, so a row reads the same as it would alone.

Nothing in a step waits for the device but the one read of the sampled tokens, which must go out to
their clients as text (and of log-probabilities, where asked for): rows' lengths are kept on the host, and
all rows' draws are one vectorised search.

A request whose prefill fails (out of memory on a long prompt, say) fails alone; a failed decode step
fails the rows in it; either way the engine carries on with the next requests. Beyond `max_queue`
requests waiting for a row, `submit` refuses new ones (QueueFull), so a flood of clients cannot grow the
queue, its latency or its memory without bound.
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

DEFAULT_MAX_QUEUE = 64  # requests waiting for a row: four batches' worth at the default max_batch_size
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens fed per step: a long prompt stalls the others this much at most


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
    slide: bool = False  # past the context, condition on its last block_size tokens, as `gptrain generate`


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


class QueueFull(Exception):
    """The engine already has max_queue requests waiting for a row: try again later."""


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

    def context(self, block_size: int) -> list[int]:
        """What the next token is conditioned on: the last block_size tokens of the prompt and the sample."""
        return (self.prompt + self.tokens)[-block_size:]

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


@dataclass(eq=False)
class Prefill:
    """Tokens on their way into a cache of their own, a chunk per step, for the requests that share them:
    the n samples of one prompt, or a request that slid past the context and recomputes its window."""

    requests: list[Request]
    tokens: list[int]
    cache: KVCache
    scores: bool = False  # report the log-probability of each token (echo with logprobs)
    fed: int = 0
    logits: torch.Tensor | None = None  # the next token's, once every token is fed
    logprobs: list[float | None] = field(default_factory=lambda: [None])
    top: list[dict[str, float] | None] = field(default_factory=lambda: [None])

    def shares(self, request: Request) -> bool:
        """Whether a new request can join: nothing fed yet, a prompt's prefill (not the window of a request
        that slid past the context), the same prompt, scored alike."""
        first = self.requests[0]
        return (self.fed == 0 and not first.tokens and request.prompt == first.prompt
                and request.sampling.echo_logprobs == first.sampling.echo_logprobs
                and request.sampling.logprobs == first.sampling.logprobs)


class RowCache(KVCache):
    """KV buffers for up to `rows` sequences that hold different numbers of tokens; the first B rows are the
    active ones. Each new token is written at its own row's end, and the mask lets each row see only its own."""

    def __init__(self, model: GPT, rows: int):
        super().__init__(model.config)
        self.rows = rows
        # on the host: reading them from the device every step would make the host wait for the GPU
        self.lengths = [0] * rows
        self.device = model.lm_head.weight.device

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
        n = self.lengths[source]
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :n] = keys[source, :, :n]
            values[target, :, :n] = values[source, :, :n]
        self.lengths[target] = n

    def begin_step(self, batch: int) -> None:
        """Where one new token in each of the first `batch` rows goes, and what each may see: its own row."""
        lengths = self.lengths[:batch]
        self.batch, self.span = batch, max(lengths) + 1  # the keys any row reads this step, its new one included
        self.ends = torch.tensor(lengths, device=self.device)  # copied while the device is idle: no wait
        self.indices = torch.arange(batch, device=self.device)
        # Rows of one length need no mask, which keeps the GPU's flash kernel; others get an additive one (made
        # at the first layer, in the keys' dtype), which SDPA takes as it is where a boolean one is converted.
        self.uneven, self.mask = min(lengths) != max(lengths), None

    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        """Each row's new token sits at its own row's end: (batch, 1)."""
        assert new == 1 and self.span <= self.block_size, "after its prefill a row grows one token at a time"
        return self.ends[:, None]

    def attend(self, layer: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        self.keys[layer][self.indices, :, self.ends] = k[:, :, 0]
        self.values[layer][self.indices, :, self.ends] = v[:, :, 0]
        if self.uneven and self.mask is None:
            hidden = torch.arange(self.span, device=k.device) > self.ends[:, None]
            self.mask = torch.zeros(hidden.shape, dtype=k.dtype, device=k.device).masked_fill_(hidden, float("-inf"))
            self.mask = self.mask[:, None, None, :]  # (batch, heads, query, keys)
        keys, values = self.keys[layer][:self.batch, :, :self.span], self.values[layer][:self.batch, :, :self.span]
        return keys, values, self.mask, False

    def advance(self, new: int) -> None:
        for row in range(self.batch):
            self.lengths[row] += new


class Engine:
    """Owns the model on one background thread and decodes every submitted request, up to `max_batch_size`
    rows at a time, with at most `max_queue` more waiting. Prompts must leave room for their max_tokens within
    the context, unless they slide: the caller checks."""

    def __init__(self, model: GPT, tokenizer, *, max_batch_size: int, max_queue: int = DEFAULT_MAX_QUEUE,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, device: torch.device, dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.max_queue, self.prefill_chunk, self.device, self.dtype = max_queue, prefill_chunk, device, dtype
        self.block_size = model.config.block_size
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefills: collections.deque[Prefill] = collections.deque()  # fed in order, a chunk a step
        self.rows: list[Request] = []  # row i of the cache holds rows[i]
        self.held = 0  # rows decoding or promised to a prefill, as of the last admission
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
        """Queue `requests`, all or none: QueueFull when more than max_queue would wait for a row."""
        assert all(r.sampling.slide or len(r.prompt) + r.sampling.max_tokens <= self.block_size
                   for r in requests), "no room to generate"
        with self.wakeup:
            if len(self.waiting) + len(requests) > self._room():
                # clients that left before their turn give their places back
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
                if len(self.waiting) + len(requests) > self._room():
                    raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.extend(requests)
            self.wakeup.notify()

    def _room(self) -> int:
        return self.max_queue + self.max_batch_size - self.held

    def _run(self) -> None:
        with torch.inference_mode(), autocast(self.device, self.dtype):
            while True:
                with self.wakeup:
                    self._admit()
                    while not (self.stopping or self.prefills or self.rows):
                        self.wakeup.wait()
                        self._admit()
                    if self.stopping:
                        return
                self._prefill_step()
                try:
                    self._decode()
                except Exception as e:  # a bug or out of memory: fail the rows still decoding, keep serving
                    self._fail(self.rows, e)
                    self.rows, self.cache = [], RowCache(self.model, self.max_batch_size)

    def _admit(self) -> None:
        """Give waiting requests the free rows (under the lock): each joins a prefill not yet begun of the same
        prompt (the n samples of one, or clients asking alike), so the prompt is fed once for all of them."""
        free = self.max_batch_size - len(self.rows) - sum(len(p.requests) for p in self.prefills)
        while free > 0 and self.waiting:
            request = self.waiting.popleft()
            if request.cancelled:
                continue
            free -= 1
            same = next((p for p in self.prefills if p.shares(request)), None)
            if same is not None:
                same.requests.append(request)
            else:
                self.prefills.append(Prefill([request], request.context(self.block_size), KVCache(self.model.config),
                                             scores=request.sampling.echo_logprobs))
        self.held = self.max_batch_size - free

    def _fail(self, requests: list[Request], error: Exception) -> None:
        traceback.print_exception(error)
        for request in requests:
            if not request.finished:  # a row can finish in the step that then fails
                request.finish("error", f"{type(error).__name__}: {error}")

    def _prefill_step(self) -> None:
        """Feed prompts in order, each in pieces of at most prefill_chunk tokens, until this step has fed as
        many as one piece may hold. A piece's bounds depend on its prompt alone, never on the traffic, so a
        prompt is computed the same way whatever else arrives."""
        fed = 0
        while self.prefills:
            prefill = self.prefills[0]
            prefill.requests = [r for r in prefill.requests if not r.cancelled]
            if not prefill.requests:  # every client of it left
                self.prefills.popleft()
                continue
            n = min(self.prefill_chunk, len(prefill.tokens) - prefill.fed)
            if fed and fed + n > self.prefill_chunk:
                return
            try:
                self._feed(prefill, n)
                fed += n
                if prefill.fed == len(prefill.tokens):
                    self.prefills.popleft()
                    self._start(prefill)
            except Exception as e:  # out of memory on a long prompt, say: only its requests fail
                if self.prefills and self.prefills[0] is prefill:
                    self.prefills.popleft()
                self._fail(prefill.requests, e)

    def _feed(self, prefill: Prefill, n: int) -> None:
        """One forward over the next n tokens of a prefill, into its cache."""
        start = prefill.fed
        ids = torch.tensor([prefill.tokens[start:start + n]], device=self.device)
        if not prefill.scores:
            logits, _ = self.model(ids, cache=prefill.cache)
        else:  # targets make the model return every position's logits; the loss is not used
            after = prefill.tokens[start + 1:start + n + 1]
            targets = torch.tensor([after + [-1] * (n - len(after))], device=self.device)
            logits, _ = self.model(ids, targets, cache=prefill.cache)
            scored = mask_padding(logits[0, :len(after)], self.tokenizer.vocab_size)
            logprobs, top = self._logprobs(scored, after, prefill.requests[0].sampling.logprobs)
            prefill.logprobs += logprobs
            prefill.top += top
        prefill.fed += n
        if prefill.fed == len(prefill.tokens):
            prefill.logits = mask_padding(logits[0, -1], self.tokenizer.vocab_size)

    def _start(self, prefill: Prefill) -> None:
        """A prefill is complete: each of its requests samples its next token and takes a row, unless that
        token finished it. A request that failed here fails alone."""
        going = []
        for request in prefill.requests:
            if request.decoder is None:  # a request that slid keeps its own
                request.decoder = StreamDecoder(self.tokenizer)
            if prefill.scores:
                request.emit(PromptLogprobs(prefill.logprobs, prefill.top))
            if request.sampling.max_tokens == 0:
                request.finish("length")
            else:
                going.append(request)
        tokens = self._sample(prefill.logits.expand(len(going), -1), going) if going else []
        for request, token in zip(going, tokens):
            try:
                if not self._accept(request, token, prefill.logits):
                    self._place(request, prefill.cache)
            except Exception as e:
                self._fail([request], e)

    def _place(self, request: Request, cache: KVCache) -> None:
        """A row for a request prefilled in `cache`; a full cache (only when sliding) is recomputed first."""
        if cache.length == self.block_size:
            self._slide(request)
        else:
            self.cache.store(len(self.rows), cache)
            self.rows.append(request)

    def _slide(self, request: Request) -> None:
        """Recompute the window of a request whose context is full: its last block_size tokens, at positions
        from 0, as `gptrain generate` does (its row, if it had one, is freed by the caller)."""
        self.prefills.append(Prefill([request], request.context(self.block_size), KVCache(self.model.config)))

    def _decode(self) -> None:
        """Decode one token for every decoding row."""
        self._drop([i for i, request in enumerate(self.rows) if request.cancelled])
        if not self.rows:
            return
        batch = len(self.rows)
        self.cache.begin_step(batch)
        inputs = torch.tensor([request.tokens[-1] for request in self.rows], device=self.device)[:, None]
        logits, _ = self.model(inputs, cache=self.cache)
        logits = mask_padding(logits[:, -1, :], self.tokenizer.vocab_size)
        leaving = []
        for i, (request, token) in enumerate(zip(self.rows, self._sample(logits, self.rows))):
            if self._accept(request, token, logits[i]):
                leaving.append(i)
            elif self.cache.lengths[i] == self.block_size:  # only when sliding: prompts leave room otherwise
                leaving.append(i)
                self._slide(request)
        self._drop(leaving)

    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        """One token per row; rows that share their settings are sampled together, each from its own stream."""
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, request in enumerate(rows):
            s = request.sampling
            groups[(s.temperature, s.top_k, s.top_p)].append(i)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for (temperature, top_k, top_p), members in groups.items():
            generators = [rows[i].generator for i in members] if temperature > 0 else None
            tokens[members] = sample_next(logits[members], temperature, top_k, top_p, generators)[:, 0]
        return tokens.tolist()  # the step's one wait for the device: the tokens go out as text

    def _logprobs(self, logits: torch.Tensor, tokens: list[int], n: int | None) -> tuple[list[float], list[dict]]:
        """For each row of (P, vocab) logits, the model's log-probability of its token, and the n most likely
        tokens' (the token's own included), all read from the device at once."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
        tops: list[dict[str, float]] = [{} for _ in tokens]
        if n:
            values, ids = torch.topk(logprobs, n)
            for top, row_values, row_ids in zip(tops, values.tolist(), ids.tolist()):
                top.update({self.tokenizer.decode([i]): v for i, v in zip(row_ids, row_values)})
        for top, token, logprob in zip(tops, tokens, chosen):
            top[self.tokenizer.decode([token])] = logprob
        return chosen, tops

    def _accept(self, request: Request, token: int, logits: torch.Tensor) -> bool:
        """Record a sampled token and emit what it released; return whether the sequence is finished."""
        request.tokens.append(token)
        logprob = top = None
        if request.sampling.logprobs is not None:
            (logprob,), (top,) = self._logprobs(logits[None], [token], request.sampling.logprobs)
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
