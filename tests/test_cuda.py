"""The GPU code paths: CUDA, bf16/fp16 autocast with the gradient scaler, torch.compile, MFU.

Skipped without a CUDA GPU; run on one before changing the training step or the model.
"""

import pytest
import torch

from gptrain.checkpoint import load_model
from gptrain.sampling import generate_tokens
from gptrain.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def val_losses(history):
    return {r["step"]: r["val/loss"] for r in history if "val/loss" in r}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compiled_mixed_precision_training_learns(tiny_config, dtype):
    history = train(tiny_config("device=cuda", f"dtype={dtype}", "compile=true", "max_iters=100",
                                "lr_decay_iters=100", "eval_interval=100", "learning_rate=1e-2", "log_interval=10"))
    val = val_losses(history)
    assert val[100] < val[0] - 0.8
    assert all(r.get("mfu") is None or 0 < r["mfu"] < 1 for r in history)


def test_resume_on_cuda_matches_the_uninterrupted_run(tiny_config, tmp_path):
    common = ("device=cuda", "dtype=bfloat16", "dropout=0.1", "gradient_accumulation_steps=2", "max_iters=8",
              "lr_decay_iters=8", "eval_interval=4")
    whole = train(tiny_config(*common, f"out_dir={tmp_path / 'whole'}"))
    train(tiny_config(*common, "max_iters=4", f"out_dir={tmp_path / 'split'}"))
    resumed = train(tiny_config(*common, "init_from=resume", f"out_dir={tmp_path / 'split'}"))
    expected = {r["step"]: r["train/loss"] for r in whole if "train/loss" in r and r["step"] >= 4}
    got = {r["step"]: r["train/loss"] for r in resumed if "train/loss" in r}
    assert got == pytest.approx(expected, rel=1e-5)


def test_cuda_generation_with_cache_equals_without(tiny_config, tmp_path):
    train(tiny_config("device=cuda", "max_iters=20"))
    model, _ = load_model(tmp_path / "out" / "ckpt.pt", device=torch.device("cuda"))
    prompt = torch.randint(0, 65, (2, 5), device="cuda")
    run = lambda cache: torch.cat(list(generate_tokens(model, prompt, 60, temperature=0, use_cache=cache)), 1)  # noqa: E731
    assert torch.equal(run(True), run(False))
