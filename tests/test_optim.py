import pytest
import torch

from gptrain.config import ConfigError, TrainConfig, load_config
from gptrain.model import GPT
from gptrain.optim import build_optimizers, lr_multiplier, set_lr


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(TrainConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=16, **overrides).model_config())


def test_lr_schedule_warms_up_then_decays_to_min():
    c = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert lr_multiplier(0, c) < lr_multiplier(5, c) < lr_multiplier(10, c) == pytest.approx(1.0, rel=1e-6)
    assert lr_multiplier(60, c) == pytest.approx(0.55)
    assert lr_multiplier(110, c) == lr_multiplier(150, c) == pytest.approx(0.1)


def test_constant_lr_after_warmup_without_decay():
    c = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, decay_lr=False)
    assert lr_multiplier(50, c) == lr_multiplier(500, c) == 1.0


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    c = TrainConfig(learning_rate=2.0, min_lr=0.2, warmup_iters=10, lr_decay_iters=100, lr_schedule="wsd",
                    decay_fraction=0.2)
    assert lr_multiplier(10, c) == lr_multiplier(50, c) == lr_multiplier(80, c) == 1.0
    assert lr_multiplier(90, c) == pytest.approx(0.55)  # halfway from 1 down to min_lr / learning_rate
    assert lr_multiplier(100, c) == lr_multiplier(120, c) == pytest.approx(0.1)


def test_wsd_warm_up_must_end_before_the_decay_starts():
    with pytest.raises(ConfigError, match=r"warmup_iters \(2000\) must be <= 1000, where lr_schedule=wsd starts"):
        load_config(["lr_schedule=wsd", "max_iters=5000", "decay_fraction=0.8"])


def test_groups_by_role_each_with_its_peak_learning_rate():
    model = tiny_model(tie_embeddings=False)
    config = TrainConfig(weight_decay=0.1, learning_rate=1e-3, embedding_lr=0.1, head_lr=4e-3)
    [adamw] = build_optimizers(model, config, "cpu")
    groups = {g["role"]: g for g in adamw.param_groups}
    assert {role: g["lr"] for role, g in groups.items()} == {"embedding": 0.1, "head": 4e-3, "matrix": 1e-3,
                                                              "vector": 1e-3}
    assert groups["vector"]["weight_decay"] == 0.0 and groups["matrix"]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups["vector"]["params"]) and all(p.dim() == 2 for p in groups["matrix"]["params"])
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))
    set_lr([adamw], config, 0.5)
    assert groups["embedding"]["lr"] == 0.05 and groups["head"]["lr"] == 2e-3
    with pytest.raises(ConfigError, match="head_lr is for an untied head"):
        build_optimizers(tiny_model(), config, "cpu")


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    adamw, muon = build_optimizers(model, TrainConfig(optimizer="muon", muon_lr=0.05), "cpu")
    hidden = {id(p) for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == hidden
    assert [g["lr"] for g in muon.param_groups] == [0.05]
    assert not hidden & {id(p) for g in adamw.param_groups for p in g["params"]}
    assert {g["role"] for g in adamw.param_groups} == {"embedding", "vector"}  # the head is tied to wte


def test_a_muon_update_of_a_hidden_matrix_is_orthogonal():
    """The gradient's singular values spread over a factor of 6 and more; the step's, all near 1 (Newton-Schulz
    leaves them within about 0.7 to 1.2 by design), once its sqrt(rows / columns) scale is divided out."""
    torch.manual_seed(0)
    model = GPT(TrainConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=65).model_config())
    _, muon = build_optimizers(model, TrainConfig(optimizer="muon", muon_lr=1.0, muon_momentum=0.0), "cpu")
    x = torch.randint(0, 65, (8, 32))
    model(x, x)[1].backward()
    weight = model.transformer.h[0].mlp.c_fc.weight  # 256 x 64
    gradient, before = torch.linalg.svdvals(weight.grad), weight.detach().clone()
    muon.step()
    step = torch.linalg.svdvals(weight.detach() - before) / 2.0
    rank = int((gradient > 1e-4 * gradient[0]).sum())  # LayerNorm's output has no mean: rank 63, not 64
    assert rank == 63 and gradient[0] / gradient[rank - 1] > 6
    assert step[:rank].min() > 0.6 and step[:rank].max() < 1.25, step
