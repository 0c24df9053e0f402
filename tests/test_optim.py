import copy
from contextlib import contextmanager, nullcontext

import pytest
import torch

from gptrain.config import ConfigError, TrainConfig, load_config
from gptrain.model import GPT
from gptrain.optim import Muon, build_optimizers, lr_multiplier, set_lr

from conftest import run_two_ranks


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



needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is new in torch 2.9")
# tall, wide and square, two of a shape batched together, and rows that 2 processes share unevenly (4 and 3)
SHAPES = [(24, 8), (8, 24), (16, 16), (24, 8), (8, 24), (7, 12)]
SETTINGS = {"lr": 0.1, "weight_decay": 0.05, "momentum": 0.9}


def matrices() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def gradients(steps: int, seed: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(steps)]


def take_steps(optimizer: torch.optim.Optimizer, grads: list[list[torch.Tensor]], context=nullcontext) -> list:
    """The parameters after one step per list of gradients."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        with context():
            optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.fixture
def torch_muon_in_float32(monkeypatch):
    """A context in which torch.optim.Muon iterates in float32: its one cast to bfloat16 becomes a cast
    to float32, the rest of its code as it is."""
    @contextmanager
    def context():
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "bfloat16", torch.Tensor.float)
            yield

    return context


@needs_torch_muon
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_muon_takes_the_steps_of_torchs(dtype, torch_muon_in_float32):
    grads = gradients(steps=4, seed=1)
    ours = take_steps(Muon(matrices(), **SETTINGS, dtype=dtype), grads)
    theirs = take_steps(torch.optim.Muon(matrices(), **SETTINGS), grads,
                        torch_muon_in_float32 if dtype == torch.float32 else nullcontext)
    start = matrices()
    # float32: to its rounding; bfloat16: within a rounding of each of the 4 steps (update entries within about 1)
    tolerance = {"rtol": 1.3e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 4 * 0.1 * 2**-8}
    for mine, reference, before in zip(ours, theirs, start):
        torch.testing.assert_close(mine - before, reference - before, **tolerance)


@needs_torch_muon
def test_a_muon_state_resumes_in_torchs_muon_and_back(torch_muon_in_float32):
    """The same state layout: saved after 2 steps by one, loaded by the other, the next 2 steps are the same."""
    first, then = gradients(steps=2, seed=1), gradients(steps=2, seed=2)

    def make(kind: type) -> torch.optim.Optimizer:
        return kind(matrices(), **SETTINGS, **({"dtype": torch.float32} if kind is Muon else {}))

    for saver, loader in [(Muon, torch.optim.Muon), (torch.optim.Muon, Muon)]:
        saved = make(saver)
        weights = take_steps(saved, first, torch_muon_in_float32)
        resumed = make(loader)
        for p, w in zip(resumed.param_groups[0]["params"], weights):
            p.data.copy_(w)
        resumed.load_state_dict(copy.deepcopy(saved.state_dict()))  # as from a file: no tensor shared
        assert resumed.state_dict()["param_groups"] == saved.state_dict()["param_groups"]
        assert all(state.keys() == {"momentum_buffer"} for state in resumed.state_dict()["state"].values())
        for mine, reference in zip(take_steps(resumed, then, torch_muon_in_float32),
                                   take_steps(saved, then, torch_muon_in_float32)):
            torch.testing.assert_close(mine, reference)


def test_muon_batches_by_shape_as_it_would_one_at_a_time():
    """Two matrices of each shape orthogonalised in one batched product, as each alone in a group of its own."""
    grads = gradients(steps=3, seed=1)
    batched = take_steps(Muon(matrices(), **SETTINGS, dtype=torch.float32), grads)
    alone = take_steps(Muon([{"params": [p]} for p in matrices()], **SETTINGS, dtype=torch.float32), grads)
    for together, apart in zip(batched, alone):
        torch.testing.assert_close(together, apart)


def _muon_under_fsdp(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    module = torch.nn.ParameterList(matrices())
    fully_shard(module, mesh=init_device_mesh("cpu", (2,)))  # each rank keeps its rows of each matrix
    optimizer = Muon(module.parameters(), **SETTINGS, dtype=torch.float32)
    for step_grads in gradients(steps=3, seed=1):
        for p, grad in zip(module.parameters(), step_grads):
            p.grad = distribute_tensor(grad, p.device_mesh, p.placements)
        optimizer.step()
    whole = [p.full_tensor().tolist() for p in module.parameters()]
    if rank == 0:
        results.put(whole)
    dist.destroy_process_group()


def test_muon_under_fsdp_takes_the_one_process_step(tmp_path):
    """Each rank's rows of the whole matrix's update, not its rows orthogonalised apart."""
    results = run_two_ranks(_muon_under_fsdp, tmp_path)
    sharded = results.get(timeout=60)
    one_process = take_steps(Muon(matrices(), **SETTINGS, dtype=torch.float32), gradients(steps=3, seed=1))
    for got, want in zip(sharded, one_process):
        torch.testing.assert_close(torch.tensor(got), want)
