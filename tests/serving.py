"""Helpers for the tests of `gptrain serve` and its playground: a tiny char model, its checkpoint, and the
real server running on a free localhost port, in a thread or as the command users start."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gptrain.config import GPTConfig
from gptrain.checkpoint import checkpoint_tokenizer, load_model
from gptrain.model import GPT
from gptrain.serve import create_app, model_info
from gptrain.tokenizer import CharTokenizer

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny-shakespeare's 65
CPU = torch.device("cpu")


def random_model(block_size: int = 128, **switches) -> GPT:
    """A tiny model with large random weights, so that its continuations differ from prompt to prompt."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=len(CHARS), **switches))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def write_checkpoint(folder: Path, model: GPT) -> Path:
    """A checkpoint as far as generation reads one: the weights, the model's shape and its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "tokenizer": CharTokenizer(CHARS).meta()}, path)
    return path


@contextlib.contextmanager
def running_server(checkpoint: Path, **options):
    """Serve `checkpoint` with uvicorn on a free port in a background thread; yield (base URL, app)."""
    import uvicorn  # the serve extra: the test modules skip without it

    model, source = load_model(checkpoint, device=CPU)
    tokenizer = checkpoint_tokenizer(source)
    app = create_app(model, tokenizer, model_info(model, tokenizer, checkpoint), device=CPU, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not (server.started and server.servers):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_command(log: Path, *args: str, env: dict | None = None):
    """`gptrain serve ARGS` as a user starts it, through the `gptrain` command's main, its output in `log`;
    yields the process once /health answers on the port its log names, and checks that it exits 0 on SIGINT
    (Ctrl-C)."""
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "gptrain.cli", "serve", *args], stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 120  # importing torch and starlette on a busy machine takes a while
        while "Uvicorn running on" not in log.read_text():
            started = process.poll() is None and time.monotonic() < deadline
            assert started, f"gptrain serve did not start:\n{log.read_text()}"
            time.sleep(0.1)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, f"gptrain serve exited {code}:\n{log.read_text()}"
