"""Serving: throughput under 1, 4 and 16 clients; a flood of clients against the bounded queue;
the inter-token latency of short requests while a long prompt arrives.

    python bench/serve.py levels                 # 6 layers, 384 wide, context 256 (nanoGPT's shakespeare_char)
    python bench/serve.py levels --clients 1 4 16 --requests 4 --max_tokens 64
    python bench/serve.py overload --flood 256 --waves 3
    python bench/serve.py levels --device cuda --clients 1 16
    git worktree add /tmp/before <commit> && python bench/serve.py long_prompt --code /tmp/before .

Each scenario writes a randomly initialised character-level model (fixed seed) as a checkpoint and starts
`gptrain serve` on it in a subprocess on a free localhost port:

  levels       each of --clients clients sends --requests completions one after the other (--max_tokens
               tokens, sampled at temperature 0.8, so none ends early). Tokens/s counts all clients'
               completion tokens over the level's wall time; "vs 1 client" is the gain of decoding
               concurrent requests together over serving them one after another. Latency is per request.
  overload     --waves times, --flood clients send one request each at the same moment against
               --max_batch_size rows and --max_queue places: how many were taken and refused (429), whether
               every one taken was answered in full and none hung, latencies, and the server's resident
               memory before the first wave and after each (flat: the queue cannot grow).
  long_prompt  --short streaming clients decode while a 1,000-token prompt arrives; the gaps between their
               tokens (inter-token latency) while it is fed, against the gaps before it. Run against each
               --code checkout in turn (a checkout before chunked prefill, then this one), back to back.

Prints markdown tables, the machine and the command, for docs/benchmarks.md. Not part of the test suite.
"""

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import torch

from side_by_side import ROOT, describe_machine, print_table

sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gptrain.config import GPTConfig  # noqa: E402
from gptrain.model import GPT  # noqa: E402
from gptrain.tokenizer import CharTokenizer  # noqa: E402

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny-shakespeare's 65
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed", "KING HENRY:"]
LONG_PROMPT_TOKENS = 1000


def write_checkpoint(folder: Path, config: GPTConfig) -> Path:
    torch.manual_seed(1337)
    path = folder / "bench-char" / "ckpt.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": GPT(config).state_dict(), "model_config": asdict(config),
                "tokenizer": CharTokenizer(CHARS).meta()}, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(checkpoint: Path, *options: str, code: Path = ROOT, device: str = "cpu"):
    """`gptrain serve` of the checkout `code` on a free port; yields its URL and process id."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "gptrain.serve", "--model_path", str(checkpoint),
                               "--port", str(port), "--device", device, *options], cwd=code,
                              env={**os.environ, "PYTHONPATH": str(code)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server of {code} did not start")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.2)
        yield url, server.pid
    finally:
        server.terminate()
        server.wait()


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def body(i: int, max_tokens: int, **more) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "seed": i, **more}


async def run_level(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, list[float], int]:
    """Wall seconds, per-request latencies and completion tokens of `clients` clients in parallel."""
    latencies, tokens = [], 0

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for r in range(requests):
            sent = time.perf_counter()
            response = await http.post("/v1/completions", json=body(c * requests + r, max_tokens))
            latencies.append(time.perf_counter() - sent)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await client(0, http)  # warm-up, untimed
        latencies.clear()
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    return time.perf_counter() - start, latencies, tokens


def levels(args, checkpoint: Path) -> None:
    with serving(checkpoint, "--max_batch_size", str(args.max_batch_size), device=args.device) as (url, _):
        results = [(clients, *asyncio.run(run_level(url, clients, args.requests, args.max_tokens)))
                   for clients in args.clients]
    print(f"--device {args.device}, {args.max_tokens} tokens per request, {args.requests} requests per client, "
          f"--max_batch_size {args.max_batch_size}\n")
    single = results[0][3] / results[0][1]
    rows = [[str(clients), str(len(latencies)), f"{tokens / seconds:.0f}", f"{(tokens / seconds) / single:.1f}x",
             f"{percentile(latencies, 50):.2f}", f"{percentile(latencies, 99):.2f}"]
            for clients, seconds, latencies, tokens in results]
    print_table(["clients", "requests", "tokens/s", f"vs {results[0][0]} client", "p50 latency (s)",
                 "p99 latency (s)"], rows)


async def flood(url: str, clients: int, max_tokens: int) -> list[tuple[int, float, int]]:
    """`clients` requests sent at once: each one's status, latency and completion tokens (-1: it hung)."""
    async def one(i: int, http: httpx.AsyncClient) -> tuple[int, float, int]:
        sent = time.perf_counter()
        try:
            response = await http.post("/v1/completions", json=body(i, max_tokens))
        except httpx.TimeoutException:
            return 0, time.perf_counter() - sent, -1
        done = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
        return response.status_code, time.perf_counter() - sent, done

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        return await asyncio.gather(*(one(i, http) for i in range(clients)))


def overload(args, checkpoint: Path) -> None:
    with serving(checkpoint, "--max_batch_size", str(args.max_batch_size), "--max_queue", str(args.max_queue)) as (
            url, pid):
        asyncio.run(flood(url, 1, args.max_tokens))  # warm-up
        memory, waves = [rss_mib(pid)], []
        for _ in range(args.waves):
            waves.append(asyncio.run(flood(url, args.flood, args.max_tokens)))
            memory.append(rss_mib(pid))
    print(f"{args.flood} clients at once, {args.waves} waves, {args.max_tokens} tokens per request, "
          f"--max_batch_size {args.max_batch_size} --max_queue {args.max_queue}; resident memory "
          f"{memory[0]:.0f} MiB before the first wave\n")
    rows = []
    for wave, (results, after) in enumerate(zip(waves, memory[1:]), 1):
        taken = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 429]
        whole = sum(r[2] == args.max_tokens for r in taken)
        hung = sum(r[2] == -1 for r in results)
        rows.append([str(wave), str(len(taken)), str(len(refused)), f"{whole} of {len(taken)}", str(hung),
                     f"{percentile([r[1] for r in taken], 50):.2f}", f"{percentile([r[1] for r in taken], 99):.2f}",
                     f"{1000 * percentile([r[1] for r in refused], 50):.0f}", f"{after:.0f}"])
    print_table(["wave", "taken", "refused (429)", "answered in full", "hung", "p50 latency (s)", "p99 latency (s)",
                 "p50 refusal (ms)", "memory after (MiB)"], rows)


async def stream_gaps(http: httpx.AsyncClient, request: dict, times: list[float]) -> None:
    """Stream one completion, appending the arrival time of each token's event to `times`."""
    async with http.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())


async def long_prompt_arrives(url: str, args) -> tuple[list[float], list[float], float]:
    """Inter-token gaps of the short streams before and while the long prompt is fed, and its latency."""
    streams: list[list[float]] = [[] for _ in range(args.short)]
    long_text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40)[:LONG_PROMPT_TOKENS]
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await http.post("/v1/completions", json=body(0, 8))  # warm-up
        shorts = [asyncio.ensure_future(stream_gaps(http, body(i, args.short_tokens), streams[i]))
                  for i in range(args.short)]
        while min(len(s) for s in streams) < 20:  # all decoding steadily
            await asyncio.sleep(0.01)
        sent = time.perf_counter()
        await http.post("/v1/completions", json={"prompt": long_text, "max_tokens": 1, "temperature": 0})
        answered = time.perf_counter()
        await asyncio.gather(*shorts)
    before, during = [], []
    for times in streams:
        for start, end in zip(times, times[1:]):
            if end <= sent:
                before.append(end - start)
            elif start < answered:  # the gap overlaps the prompt's feeding
                during.append(end - start)
    return before, during, answered - sent


def long_prompt(args, checkpoint: Path) -> None:
    rows = []
    for code in args.code:
        with serving(checkpoint, "--max_batch_size", str(args.max_batch_size), code=code) as (url, _):
            before, during, latency = asyncio.run(long_prompt_arrives(url, args))
        rows.append([str(code), f"{1000 * percentile(before, 50):.1f}", f"{1000 * percentile(during, 50):.1f}",
                     f"{1000 * percentile(during, 99):.1f}", f"{1000 * max(during, default=float('nan')):.1f}",
                     f"{latency:.2f}"])
    print(f"{args.short} streaming requests of {args.short_tokens} tokens; a {LONG_PROMPT_TOKENS}-token prompt "
          f"arrives once each has 20; inter-token latency of the streams, ms\n")
    print_table(["code", "p50 before", "p50 while it is fed", "p99 while it is fed", "max while it is fed",
                 "long prompt answered in (s)"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=["levels", "overload", "long_prompt"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="levels: concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="levels: requests per client at each level")
    p.add_argument("--max_tokens", type=int, default=64, help="levels, overload: tokens per completion")
    p.add_argument("--flood", type=int, default=256, help="overload: clients sending at the same moment")
    p.add_argument("--waves", type=int, default=3, help="overload: floods, one after the other")
    p.add_argument("--max_queue", type=int, default=64, help="overload: the server's --max_queue")
    p.add_argument("--short", type=int, default=4, help="long_prompt: streaming requests decoding meanwhile")
    p.add_argument("--short_tokens", type=int, default=200, help="long_prompt: tokens of each stream")
    p.add_argument("--code", type=Path, nargs="+", default=[ROOT],
                   help="long_prompt: checkouts to serve from, in turn (default: this one)")
    p.add_argument("--max_batch_size", type=int, default=16, help="the server's --max_batch_size")
    p.add_argument("--device", default="cpu", help="levels: the server's --device (default: cpu)")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--block_size", type=int, default=256, help="context (long_prompt: at least 1,024)")
    args = p.parse_args()
    block_size = max(args.block_size, 1024) if args.scenario == "long_prompt" else args.block_size
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=block_size,
                       vocab_size=len(CHARS), dropout=0.0)
    params = GPT(config).num_params(non_embedding=False)
    print(f"`gptrain serve`, {params / 1e6:.1f}M-parameter char model ({args.n_layer} layers, {args.n_embd} wide, "
          f"context {block_size}), float32, CPU: {args.scenario}")
    with tempfile.TemporaryDirectory(prefix="gptrain-bench-serve-") as tmp:
        {"levels": levels, "overload": overload, "long_prompt": long_prompt}[args.scenario](
            args, write_checkpoint(Path(tmp), config))
    print()
    print(describe_machine())


if __name__ == "__main__":
    main()
