"""Shared fixtures: a small character-level corpus prepared once, and a tiny model's settings."""

from pathlib import Path

import pytest

from gptrain.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def run_two_ranks(target, tmp_path: Path):
    """target(rank, init_file, results) on 2 spawned processes that rendezvous through a file in tmp_path;
    returns the queue they put their results in."""
    import torch.multiprocessing

    results = torch.multiprocessing.get_context("spawn").Queue()
    torch.multiprocessing.start_processes(target, args=(str(tmp_path / "init"), results), nprocs=2,
                                          start_method="spawn")
    return results


def prepare_char_data(root: Path) -> Path:
    """The first 200 kB of tiny-shakespeare, prepared by the real `gptrain prepare` at character level
    into root/data (deterministic: tests/fixtures/make_fixtures.py trains on the same)."""
    from gptrain.prepare import main as prepare

    corpus = root / "input.txt"
    corpus.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000])
    prepare(["--input", str(corpus), "--tokenizer", "char", "--out_dir", str(root / "data")])
    return root / "data"


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    return prepare_char_data(tmp_path_factory.mktemp("shakespeare_char"))


@pytest.fixture
def tiny_args(char_data, tmp_path):
    """The command line of a 2-layer, 32-wide model that trains in about a second on a CPU."""

    def make(*overrides: str) -> list[str]:
        return [
            f"data_dir={char_data}", f"out_dir={tmp_path / 'out'}", f"log_dir={tmp_path / 'logs'}",
            "n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", "gradient_accumulation_steps=1",
            "tokens_per_step=null",
            "learning_rate=3e-3", "min_lr=3e-4", "warmup_iters=5", "max_iters=20", "lr_decay_iters=20",
            "eval_interval=10", "eval_iters=4", "log_interval=1", "device=cpu", "dtype=float32",
            "compile=false", "tensorboard=false", *overrides,
        ]

    return make


@pytest.fixture
def tiny_config(tiny_args):
    """Those settings as a validated config."""
    return lambda *overrides: load_config(tiny_args(*overrides))
