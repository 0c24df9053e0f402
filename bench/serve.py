"""Serving throughput and latency: `gptrain serve` on the CPU under 1, 4 and 16 concurrent clients.

    python bench/serve.py                        # 6 layers, 384 wide, context 256 (nanoGPT's shakespeare_char)
    python bench/serve.py --clients 1 4 16 --requests 4 --max_tokens 64
    python bench/serve.py --device cuda --clients 1 16

Writes a randomly initialised character-level model (fixed seed) as a checkpoint, starts `gptrain serve`
on it in a subprocess on a free localhost port, and for each number of clients has every client send
--requests completions one after the other (--max_tokens tokens each, sampled at temperature 0.8, so no
request ends early). Tokens/s counts the completion tokens of all clients over the wall time of the
level; latency is per request, from sending it to its whole answer. Prints a markdown table, the machine
and the command, for docs/benchmarks.md. Not part of the test suite.
"""

import argparse
import asyncio
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


def wait_until_up(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


async def run_level(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, list[float], int]:
    """Wall seconds, per-request latencies and completion tokens of `clients` clients in parallel."""
    latencies, tokens = [], 0

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for r in range(requests):
            body = {"prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
                    "seed": c * requests + r}
            sent = time.perf_counter()
            response = await http.post("/v1/completions", json=body)
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


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    p.add_argument("--max_tokens", type=int, default=64, help="tokens per completion")
    p.add_argument("--max_batch_size", type=int, default=16, help="the server's --max_batch_size")
    p.add_argument("--device", default="cpu", help="the server's --device (default: cpu)")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--block_size", type=int, default=256)
    args = p.parse_args()
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                       vocab_size=len(CHARS), dropout=0.0)
    with tempfile.TemporaryDirectory(prefix="gptrain-bench-serve-") as tmp:
        checkpoint = write_checkpoint(Path(tmp), config)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "gptrain.serve", "--model_path", str(checkpoint),
                                   "--port", str(port), "--max_batch_size", str(args.max_batch_size),
                                   "--device", args.device], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            wait_until_up(url, server)
            results = [(clients, *asyncio.run(run_level(url, clients, args.requests, args.max_tokens)))
                       for clients in args.clients]
        finally:
            server.terminate()
            server.wait()
    params = GPT(config).num_params(non_embedding=False)
    print(f"`gptrain serve --device {args.device}`, {params / 1e6:.1f}M-parameter char model "
          f"({args.n_layer} layers, {args.n_embd} wide, "
          f"context {args.block_size}), {args.max_tokens} tokens per request, {args.requests} requests per client, "
          f"--max_batch_size {args.max_batch_size}\n")
    single = results[0][3] / results[0][1]
    rows = [[str(clients), str(len(latencies)), f"{tokens / seconds:.0f}", f"{(tokens / seconds) / single:.1f}x",
             f"{percentile(latencies, 50):.2f}", f"{percentile(latencies, 99):.2f}"]
            for clients, seconds, latencies, tokens in results]
    print_table(["clients", "requests", "tokens/s", f"vs {results[0][0]} client", "p50 latency (s)",
                 "p99 latency (s)"], rows)
    print()
    print(describe_machine())


if __name__ == "__main__":
    main()
