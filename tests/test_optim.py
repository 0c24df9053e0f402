import pytest

from gptrain.config import TrainConfig
from gptrain.model import GPT
from gptrain.optim import build_optimizer, lr_at


def test_lr_schedule_warms_up_then_decays_to_min():
    c = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert lr_at(0, c) < lr_at(5, c) < lr_at(10, c) == pytest.approx(1.0, rel=1e-6)
    assert lr_at(60, c) == pytest.approx(0.55)
    assert lr_at(110, c) == lr_at(150, c) == 0.1


def test_constant_lr_after_warmup_without_decay():
    c = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, decay_lr=False)
    assert lr_at(50, c) == lr_at(500, c) == 1.0


def test_only_matrices_are_decayed():
    model = GPT(TrainConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=16).model_config())
    decayed, plain = build_optimizer(model, TrainConfig(weight_decay=0.1), "cpu").param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
