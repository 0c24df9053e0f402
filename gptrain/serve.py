"""Serve a checkpoint over HTTP with OpenAI's completions API, and a playground page to try it in a browser.

Any OpenAI client, lm-evaluation-harness's `local-completions` or curl can then use a trained model:

    POST /v1/completions   prompt (text, texts, token ids), max_tokens, temperature, top_p, top_k, n, stop, seed,
                           stream (server-sent events, one per token), echo, logprobs; unknown fields are ignored;
                           and one field of gptrain's own, slide (below)
    GET  /v1/models        the model's name, parameter count, tokenizer and context length
    GET  /health           {"status": "ok"}
    GET  /                 the playground

Concurrent requests decode together in one batch (gptrain.batching), so a busy server stays fast; beyond
--max_queue requests waiting for a row, new ones get 429 with Retry-After, so a flood of clients meets a
prompt refusal rather than an ever longer wait. A seeded request draws the same tokens as
`gptrain generate --seed` with the same settings. It binds to 127.0.0.1 unless told otherwise; --api_key
(or $GPTRAIN_API_KEY) makes /v1/ require `Authorization: Bearer KEY`.

Like OpenAI's API, a request whose prompt and max_tokens exceed the context is refused (400). With
"slide": true it is not: as `gptrain generate` does, each token past the context is conditioned on the
last context-length tokens (a prompt longer than the context keeps its end), at the cost of recomputing
that window for each such token. The playground asks for it.

Usage: gptrain serve --model_path checkpoints/ckpt.pt [--host 127.0.0.1] [--port 8000] [--max_batch_size 16]
                     [--max_queue 64] [--prefill_chunk 256]
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from gptrain.batching import (DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK, Engine, Finish, PromptLogprobs, QueueFull,
                               Request, Sampling, Token)
from gptrain.config import DTYPE_NAMES
from gptrain.device import resolve_device, resolve_dtype
from gptrain.errors import UserError, command
from gptrain.extras import require
from gptrain.checkpoint import checkpoint_tokenizer, load_model
from gptrain.model import GPT
from gptrain.sampling import sample_generators
from gptrain.tokenizer import TokenizerError

try:  # the `serve` extra; without it `gptrain serve --help` still works, and main() names the pip install
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError:
    pass

PLAYGROUND = Path(__file__).parent / "static" / "playground.html"
API_KEY_VARIABLE = "GPTRAIN_API_KEY"
MAX_STOPS, MAX_LOGPROBS, MAX_N = 4, 5, 128  # OpenAI's limits (n: ours)
RETRY_AFTER_S = 1  # what a refused client is told to wait: about the time a row takes to free up


class ServeError(UserError):
    """A bad `gptrain serve` setting."""


class RequestError(Exception):
    """A request the server refuses, answered with `status` and OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        # OpenAI's types: "requests" is that of its 429s (too many requests)
        kind = {429: "requests"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """A checked completions request: the prompts as token ids, and how to sample and answer."""

    prompts: list[list[int]]
    texts: list[str]  # the prompts as text, for echo
    sampling: Sampling
    n: int
    seed: int | None
    echo: bool
    stream: bool
    include_usage: bool


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# name: (default, check, what the check asks for); a null value means the default, as in OpenAI's API
FIELDS = {
    "max_tokens": (16, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "temperature": (1.0, lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2"),
    "top_p": (1.0, lambda v: _is_number(v) and 0 < v <= 1, "a number > 0 and <= 1"),
    "top_k": (0, lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: all tokens)"),
    "n": (1, lambda v: _is_int(v) and 1 <= v <= MAX_N, f"an integer from 1 to {MAX_N}"),
    "seed": (None, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "stream": (False, lambda v: isinstance(v, bool), "a boolean"),
    "echo": (False, lambda v: isinstance(v, bool), "a boolean"),
    "logprobs": (None, lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS, f"an integer from 0 to {MAX_LOGPROBS}"),
    "stop": (None, lambda v: isinstance(v, str) and v != "" or isinstance(v, list) and len(v) <= MAX_STOPS
             and all(isinstance(s, str) and s for s in v), f"a non-empty string or a list of at most {MAX_STOPS}"),
    "stream_options": (None, lambda v: isinstance(v, dict) and isinstance(v.get("include_usage", False), bool),
                       'an object such as {"include_usage": true}'),
    "slide": (False, lambda v: isinstance(v, bool), "a boolean"),  # gptrain's own
}


def parse_request(body, tokenizer, block_size: int) -> Completion:
    """Check a completions request, reporting every bad field at once, and encode its prompts."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    values, problems = {}, []
    for name, (default, check, wanted) in FIELDS.items():
        value = body.get(name)
        if value is not None and not check(value):
            problems.append((name, f"{name} must be {wanted}, got {json.dumps(value)[:40]}"))
        values[name] = default if value is None else value
    prompts, texts = [], []
    try:
        prompts, texts = encode_prompts(body.get("prompt"), tokenizer)
    except RequestError as e:
        problems.append(("prompt", str(e)))
    if problems:
        raise RequestError("; ".join(message for _, message in problems), param=problems[0][0])
    max_tokens, echo_logprobs = values["max_tokens"], values["echo"] and values["logprobs"] is not None
    for ids in prompts:
        if values["slide"] and echo_logprobs and len(ids) > block_size:
            raise RequestError(f"echo with logprobs scores a prompt of at most the context, {block_size} tokens; "
                               f"this one has {len(ids)}", param="prompt", code="context_length_exceeded")
        if not values["slide"] and len(ids) + max_tokens > block_size:
            raise RequestError(f"This model's maximum context length is {block_size} tokens, however you requested "
                               f"{len(ids) + max_tokens} tokens ({len(ids)} in your prompt; {max_tokens} for the "
                               f"completion). Please reduce your prompt or completion length.",
                               param="prompt", code="context_length_exceeded")
    stop = values["stop"]
    sampling = Sampling(temperature=float(values["temperature"]), top_k=values["top_k"] or None,
                        top_p=float(values["top_p"]), max_tokens=max_tokens,
                        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()), logprobs=values["logprobs"],
                        echo_logprobs=echo_logprobs, slide=values["slide"])
    return Completion(prompts, texts, sampling, n=values["n"], seed=values["seed"], echo=values["echo"],
                      stream=values["stream"],
                      include_usage=bool((values["stream_options"] or {}).get("include_usage")))


def encode_prompts(prompt, tokenizer) -> tuple[list[list[int]], list[str]]:
    """A prompt given as text, a list of texts, token ids or a list of token-id lists, as lists of token ids
    and texts. An empty prompt starts from end-of-text, as `gptrain generate` does."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(p, str) or isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        raise RequestError("prompt is required: a string, a list of strings, a list of token ids or a list of those")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            try:
                tokens = tokenizer.encode(p)
            except TokenizerError as e:
                raise RequestError(str(e)) from None
            text = p
        else:
            if not all(0 <= t < tokenizer.vocab_size for t in p):
                raise RequestError(f"prompt token ids must be from 0 to {tokenizer.vocab_size - 1}")
            tokens, text = list(p), tokenizer.decode(list(p))
        if not tokens:
            if tokenizer.eot_id is None:
                raise RequestError("prompt is empty and this tokenizer has no end-of-text token to start from")
            tokens = [tokenizer.eot_id]
        ids.append(tokens)
        texts.append(text)
    return ids, texts


@dataclass
class Choice:
    """One choice of a response, as its events arrive."""

    index: int
    prompt: str
    prompt_tokens: list[str]  # each prompt token as text, for echo with logprobs
    text: str = ""
    tokens: int = 0
    finish: Finish | None = None
    logprobs: dict | None = None  # OpenAI's tokens, token_logprobs, top_logprobs and text_offset lists
    offset: int = 0  # where the next token's text starts in the choice's text (the prompt's included)

    def add(self, event, tokenizer) -> dict:
        """Take one event; return what it adds to the choice, as a streamed chunk's choice."""
        chunk = {"text": "", "index": self.index, "logprobs": None, "finish_reason": None}
        if isinstance(event, PromptLogprobs):
            chunk["text"] = self.prompt
            chunk["logprobs"] = self._log(self.prompt_tokens, event.logprobs, event.top)
        elif isinstance(event, Token):
            self.tokens += 1
            chunk["text"] = event.text
            if event.logprob is not None:
                chunk["logprobs"] = self._log([tokenizer.decode([event.id])], [event.logprob], [event.top])
        else:
            self.finish = event
            chunk["finish_reason"] = event.reason
        self.text += chunk["text"]
        return chunk

    def _log(self, tokens: list[str], logprobs: list, top: list) -> dict:
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        piece = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}
        if self.logprobs is None:
            self.logprobs = {key: [] for key in piece}
        for key, values in piece.items():
            self.logprobs[key] += values
        return piece

    def result(self) -> dict:
        return {"text": self.text, "index": self.index, "logprobs": self.logprobs,
                "finish_reason": self.finish.reason if self.finish else None}


@dataclass
class ModelInfo:
    """What /v1/models and the playground show."""

    name: str
    parameters: int
    tokenizer: str
    context_length: int
    created: int

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gptrain",
                "parameters": self.parameters, "tokenizer": self.tokenizer, "context_length": self.context_length}


class Server:
    """What the routes share: the engine that decodes, the tokenizer, the model's card and the API key.
    Each route is a method; `create_app` wires them to their paths."""

    def __init__(self, engine: Engine, tokenizer, info: ModelInfo, *, api_key: str | None):
        self.engine, self.tokenizer, self.info, self.api_key = engine, tokenizer, info, api_key
        self.device, self.block_size = engine.device, engine.block_size
        self.most = engine.max_batch_size + engine.max_queue  # sequences one request may ask for

    @asynccontextmanager
    async def lifespan(self, app):
        self.engine.start()
        yield
        self.engine.stop()

    async def playground(self, request):
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    async def health(self, request):
        return JSONResponse({"status": "ok"})

    async def models(self, request):
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.info.card()]})

    async def completions(self, request):
        self.authorize(request)
        try:
            body = await request.json()
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None
        job = parse_request(body, self.tokenizer, self.block_size)
        if job.n * len(job.prompts) > self.most:  # it would never fit, so waiting would not help
            raise RequestError(f"this server decodes at most {self.most} sequences for one request (n times the "
                               f"prompts), got {job.n * len(job.prompts)}", param="n")
        queue: asyncio.Queue = asyncio.Queue()
        try:
            submitted, choices = self.submit(job, queue)
        except QueueFull:
            raise RequestError(f"the server is busy: {self.engine.max_queue} requests are waiting already; retry "
                               f"after {RETRY_AFTER_S} s", status=429, code="rate_limit_exceeded") from None
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": self.info.name}
        if job.stream:
            return StreamingResponse(self.stream(job, queue, submitted, choices, header),
                                     media_type="text/event-stream")
        collecting = asyncio.ensure_future(self.collect(queue, choices))
        leaving = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
            for each in submitted:  # a client gone before the end frees its rows
                each.cancelled = True
        if not collecting.done():
            collecting.cancel()
            return Response(status_code=499)  # nobody is there to read it
        collecting.result()
        return JSONResponse({**header, "choices": [c.result() for c in choices], "usage": usage(job, choices)})

    def authorize(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError("missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                               status=401, code="invalid_api_key")

    def submit(self, job: Completion, queue: asyncio.Queue) -> tuple[list[Request], list[Choice]]:
        """Queue every choice with the engine; each reports its events to `queue` as (index, event)."""
        loop = asyncio.get_running_loop()

        def reporter(index: int):
            def emit(event) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                except RuntimeError:  # the event loop has closed: the server is stopping
                    pass
            return emit

        submitted, choices = [], []
        echo_now = job.echo and not job.sampling.echo_logprobs  # else the prompt comes with its logprobs
        for ids, text in zip(job.prompts, job.texts):
            sampled = job.sampling.temperature > 0  # greedy needs no random stream
            generators = sample_generators(job.n, job.seed, self.device) if sampled else [None] * job.n
            prompt_tokens = [self.tokenizer.decode([t]) for t in ids] if job.sampling.echo_logprobs else []
            for generator in generators:
                index = len(submitted)
                submitted.append(Request(ids, job.sampling, reporter(index), generator))
                choices.append(Choice(index, text, prompt_tokens, text=text if echo_now else "",
                                      offset=0 if job.sampling.echo_logprobs else len(text)))
        self.engine.submit(submitted)
        return submitted, choices

    async def collect(self, queue: asyncio.Queue, choices: list[Choice]) -> None:
        while not all(c.finish for c in choices):
            index, event = await queue.get()
            choices[index].add(event, self.tokenizer)
        failed = next((c.finish.error for c in choices if c.finish.reason == "error"), None)
        if failed:
            raise RequestError(f"generation failed: {failed}", status=500)

    async def stream(self, job: Completion, queue: asyncio.Queue, submitted: list[Request], choices: list[Choice],
                     header: dict):
        """Server-sent events: the echoed prompt, then one event per token; the finish reasons, usage when
        asked for, and [DONE]. A client that leaves cancels its engine requests (the next write fails)."""
        def event(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"
        try:
            if job.echo and not job.sampling.echo_logprobs:
                for c in choices:
                    yield event({**header, "choices": [{"text": c.prompt, "index": c.index, "logprobs": None,
                                                        "finish_reason": None}]})
            while not all(c.finish for c in choices):
                index, item = await queue.get()
                chunk = choices[index].add(item, self.tokenizer)
                if isinstance(item, Finish) and item.reason == "error":
                    yield event(RequestError(f"generation failed: {item.error}", status=500).body())
                    break
                yield event({**header, "choices": [chunk]})
            if job.include_usage:
                yield event({**header, "choices": [], "usage": usage(job, choices)})
            yield "data: [DONE]\n\n"
        finally:
            for each in submitted:
                each.cancelled = True


async def refused(request, error: RequestError):
    retry = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else None  # OpenAI's clients honour it
    return JSONResponse(error.body(), status_code=error.status, headers=retry)


async def http_error(request, error: HTTPException):  # unknown paths and methods, in OpenAI's shape too
    return JSONResponse(RequestError(str(error.detail), status=error.status_code).body(),
                        status_code=error.status_code)


async def failed(request, error: Exception):  # a bug: this request fails, the server carries on
    return JSONResponse(RequestError(f"internal error: {type(error).__name__}: {error}", status=500).body(),
                        status_code=500)


def create_app(model: GPT, tokenizer, info: ModelInfo, *, max_batch_size: int = 16, max_queue: int = DEFAULT_MAX_QUEUE,
               prefill_chunk: int = DEFAULT_PREFILL_CHUNK, device: torch.device, dtype: torch.dtype = torch.float32,
               api_key: str | None = None):
    """The ASGI application (Starlette, which FastAPI is built on); its lifespan runs the decode engine.
    Needs the `serve` extra, which `main` checks for."""
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                    prefill_chunk=prefill_chunk, device=device, dtype=dtype)
    server = Server(engine, tokenizer, info, api_key=api_key)
    routes = [Route("/", server.playground), Route("/health", server.health), Route("/v1/models", server.models),
              Route("/v1/completions", server.completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=server.lifespan,
                    exception_handlers={RequestError: refused, HTTPException: http_error, Exception: failed})
    app.state.engine = server.engine
    return app


async def disconnected(request) -> None:
    """Return once the client has closed its connection (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage(job: Completion, choices: list[Choice]) -> dict:
    prompt, completion = sum(len(p) for p in job.prompts), sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_info(model: GPT, tokenizer, path: str | Path) -> ModelInfo:
    """The model's name is its checkpoint's directory: the run's out_dir."""
    path = Path(path).resolve()
    return ModelInfo(name=path.parent.name, parameters=model.num_params(non_embedding=False),
                     tokenizer=tokenizer.name, context_length=model.config.block_size,
                     created=int(path.stat().st_mtime))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptrain serve", description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="checkpoints/ckpt.pt", help="checkpoint to serve")
    p.add_argument("--meta", default=None, help="vocabulary for a checkpoint that records none (as gptrain generate)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max_batch_size", type=int, default=16, help="most sequences decoded together in one batch")
    p.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="most sequences waiting for a row beyond the batch; past it, 429 with Retry-After")
    p.add_argument("--prefill_chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens fed per step: a long prompt delays the decoding rows by this much at most")
    p.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_VARIABLE}, if set)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help="precision; auto: bfloat16 on recent GPUs")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    problems = [*(["--port must be from 0 to 65535"] if not 0 <= args.port <= 65535 else []),
                *(["--max_batch_size must be >= 1"] if args.max_batch_size < 1 else []),
                *(["--max_queue must be >= 0"] if args.max_queue < 0 else []),
                *(["--prefill_chunk must be >= 1"] if args.prefill_chunk < 1 else [])]
    if problems:
        raise ServeError("; ".join(problems))
    require("starlette", "serve", "gptrain serve", error=ServeError)  # before the checkpoint takes time to load
    uvicorn = require("uvicorn", "serve", "gptrain serve", error=ServeError)
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.model_path, device=device)
    tokenizer = checkpoint_tokenizer(checkpoint, args.meta)
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    app = create_app(model, tokenizer, model_info(model, tokenizer, args.model_path),
                     max_batch_size=args.max_batch_size, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                     device=device, dtype=resolve_dtype(args.dtype, device), api_key=api_key)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
