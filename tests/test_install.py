"""The core and each extra, installed alone into a fresh virtual environment, run what they enable: what
pyproject.toml declares is enough, and nothing from another extra is needed.

Slow (a virtual environment and a pip install each, from minutes to a quarter of an hour in all), so
deselected by default; run with `python -m pytest -m install`. torch is installed once, as the README
says (`pip install torch==2.13.0`), into a base environment that the others see through a .pth file:
it is the one package they share, a gigabyte that each would otherwise unpack anew. Every command runs
in the new environment from a folder outside the checkout, with no PYTHONPATH, so it imports the
installed gptrain (an editable install of this checkout) and only what that installed.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"
TIMEOUT = 1800  # seconds for one pip install or command on a loaded 2-core machine
TINY = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=16", "batch_size=4", "tokens_per_step=null",
        "gradient_accumulation_steps=1", "max_iters=6", "lr_decay_iters=6", "warmup_iters=1", "eval_interval=3",
        "eval_iters=2", "log_interval=1", "device=cpu", "compile=false", "tensorboard=false"]


class Env:
    """A virtual environment: run its console scripts and its Python, outside the checkout."""

    def __init__(self, root: Path):
        self.root, self.work = root, root / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.vars = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.vars["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}"

    def run(self, *command: str, env: dict | None = None, timeout: int = TIMEOUT) -> str:
        done = subprocess.run(command, cwd=self.work, env={**self.vars, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                     f"{done.stderr[-3000:]}"
        return done.stdout

    def python(self, code: str) -> str:
        return self.run(str(self.root / "bin" / "python"), "-c", code)

    def train(self, data: Path, name: str, *overrides: str, env: dict | None = None) -> Path:
        """A tiny model trained a few steps by `gptrain train`; returns its out_dir."""
        out = self.work / name
        self.run("gptrain", "train", f"data_dir={data}", f"out_dir={out}", f"log_dir={self.work / 'logs'}", *TINY,
                 *overrides, env=env)
        return out

    def char_data(self) -> Path:
        corpus = self.work / "corpus.txt"
        corpus.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:100_000])
        self.run("gptrain", "prepare", "--input", str(corpus), "--tokenizer", "char", "--out_dir",
                 str(self.work / "char"))
        return self.work / "char"


@pytest.fixture(scope="session")
def torch_site(tmp_path_factory) -> Path:
    """The site-packages of an environment holding torch (and what it needs) alone."""
    root = tmp_path_factory.mktemp("venv-torch")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=TIMEOUT)
    subprocess.run([str(root / "bin" / "pip"), "install", "-q", TORCH], check=True, timeout=TIMEOUT)
    return Path(Env(root).python("import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())


def fresh(tmp_path: Path, torch_site: Path, extra: str | None) -> Env:
    """A new environment that sees torch and has gptrain installed, with `extra` if given."""
    root = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=TIMEOUT)
    env = Env(root)
    site = Path(env.python("import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "torch_base.pth").write_text(f"{torch_site}\n")
    env.run(str(root / "bin" / "pip"), "install", "-q", "-e", f"{ROOT}[{extra}]" if extra else str(ROOT))
    return env


def check_core(env: Env) -> None:
    """prepare, train, generate; and the one line that names the extra a feature needs."""
    out = env.train(env.char_data(), "core")
    text = env.run("gptrain", "generate", "--model_path", str(out / "ckpt.pt"), "--max_new_tokens", "20", "--seed", "1")
    assert text.strip()
    for module in ("datasets", "tokenizers", "transformers", "matplotlib", "wandb", "lm_eval", "starlette"):
        env.python(f"import importlib.util as u; assert u.find_spec({module!r}) is None, {module!r}")
    done = subprocess.run(["gptrain", "prepare", "--input", str(env.work / "corpus.txt"), "--tokenizer", "bpe",
                           "--out_dir", str(env.work / "bpe")], cwd=env.work, env=env.vars, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert (done.returncode, done.stderr) == (2, 'error: the bpe tokenizer needs the tokenizers package: '
                                                 'pip install "gptrain[data]"\n')
    run_tests(env, ROOT / "tests")  # the README's `pip install -e . && python -m pytest`: what needs an extra skips


def check_data(env: Env) -> None:
    """A JSON-lines corpus with a trained BPE, a Parquet file, and a saved datasets folder."""
    docs = [d for d in (ROOT / "data" / "tinyshakespeare.txt").read_text()[:60_000].split("\n\n") if d.strip()]
    (env.work / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    env.run("gptrain", "prepare", "--input", "docs.jsonl", "--tokenizer", "bpe", "--vocab_size", "400",
            "--out_dir", "bpe")
    env.python(f"import pyarrow as pa, pyarrow.parquet as pq, datasets; docs = {docs!r}; "
               "pq.write_table(pa.table({'text': docs}), 'docs.parquet'); "
               "datasets.Dataset.from_dict({'text': docs}).save_to_disk('saved')")
    for source in ("docs.parquet", "saved"):
        env.run("gptrain", "prepare", "--input", source, "--tokenizer", "gpt2", "--out_dir", f"from_{source}")
    bpe, parquet, saved = (json.loads((env.work / out / "meta.json").read_text())
                           for out in ("bpe", "from_docs.parquet", "from_saved"))
    assert bpe["vocab_size"] == 400 and parquet["train"] == saved["train"]


def check_hf(env: Env) -> None:
    """gptrain export, then transformers loads what it wrote."""
    out = env.train(env.char_data(), "hf")
    env.run("gptrain", "export", "--model_path", str(out / "ckpt.pt"), "--out", "exported")
    env.python("from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('exported')")


def check_plot(env: Env) -> None:
    out = env.train(env.char_data(), "plot")
    env.run("gptrain", "plot", str(out), "-o", "curves.png")
    assert (env.work / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_wandb(env: Env) -> None:
    out = env.train(env.char_data(), "wandb", "wandb_log=true", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert list((out / "wandb").glob("offline-run-*"))


def run_tests(env: Env, *paths: Path) -> None:
    """This checkout's tests (`paths` of them), with pytest, in the environment."""
    env.run(str(env.root / "bin" / "pip"), "install", "-q", "pytest")
    env.run(str(env.root / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
            *map(str, paths))


def check_eval(env: Env) -> None:
    """The harness's own tests, which run lm-eval on local tasks, in this environment."""
    run_tests(env, ROOT / "tests" / "test_harness.py")


def check_serve(env: Env) -> None:
    """gptrain serve answers one completion over HTTP."""
    out = env.train(env.char_data(), "serve")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (env.work / "serve.log").open("w")
    server = subprocess.Popen(["gptrain", "serve", "--model_path", str(out / "ckpt.pt"), "--port", str(port),
                               "--device", "cpu"], cwd=env.work, env=env.vars, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while server.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(
            {"prompt": "ROMEO:", "max_tokens": 8, "seed": 1}).encode(), headers={"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=120))
        assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["text"]
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


CHECKS = {None: check_core, "data": check_data, "hf": check_hf, "plot": check_plot, "wandb": check_wandb,
          "eval": check_eval, "serve": check_serve}


@pytest.mark.parametrize("extra", list(CHECKS), ids=lambda extra: extra or "core")
def test_each_extra_alone_runs_what_it_enables(extra, tmp_path, torch_site):
    CHECKS[extra](fresh(tmp_path, torch_site, extra))
