"""The optimizers and the learning-rate schedule.

Parameters are grouped by role, each group with its own peak learning rate: the embeddings, an untied
output head, the blocks' 2-D matrices, and the vectors (norm gains, biases). With optimizer=muon the
matrices go to Muon and the rest stay with AdamW. The schedule is one multiplier applied to every
group's peak, so all groups warm up and decay together.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from gptrain.config import ConfigError, TrainConfig
from gptrain.device import DTYPES, native_bfloat16
from gptrain.distributed import own_slice


def param_role(name: str, p: nn.Parameter) -> str:
    """embedding | head | matrix | vector. A tied head is the token embedding, and takes its role."""
    if name.startswith(("transformer.wte.", "transformer.wpe.")):
        return "embedding"
    if name.startswith("lm_head."):
        return "head"
    return "matrix" if p.dim() >= 2 else "vector"


def peak_lr(role: str, config: TrainConfig) -> float:
    """A group's peak learning rate, read from the config at every step, so a resumed run takes new rates."""
    own = {"embedding": config.embedding_lr, "head": config.head_lr,
           "matrix": config.muon_lr if config.optimizer == "muon" else None}.get(role)
    return own if own is not None else config.learning_rate


def build_optimizers(model: nn.Module, config: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
    """AdamW over every role (decaying the 2-D ones, never biases or norm gains), or, with optimizer=muon,
    Muon over the blocks' matrices and AdamW over the rest."""
    by_role: dict[str, list[nn.Parameter]] = {"embedding": [], "head": [], "matrix": [], "vector": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_role[param_role(name, p)].append(p)
    if config.head_lr is not None and not by_role["head"]:
        raise ConfigError("head_lr is for an untied head (tie_embeddings=false); this model's head is its token "
                          "embedding, which embedding_lr sets")

    def group(role: str, decay: bool) -> dict:
        return {"params": by_role[role], "lr": peak_lr(role, config), "role": role,
                "weight_decay": config.weight_decay if decay else 0.0}

    adamw_roles = ["embedding", "head"] + (["matrix"] if config.optimizer == "adamw" else [])
    adamw_groups = [group(role, decay=True) for role in adamw_roles] + [group("vector", decay=False)]
    # The fused kernel updates every parameter in one pass (one launch on a GPU). On the CPU too it beats
    # the per-parameter loop: 59 to 75 ms against 613 to 627 a step for GPT-2 124M (docs/benchmarks.md).
    optimizers = [torch.optim.AdamW([g for g in adamw_groups if g["params"]], betas=(config.beta1, config.beta2),
                                    fused=device_type in ("cuda", "cpu"))]
    if config.optimizer == "muon":
        # Momentum, then the update orthogonalised by Newton-Schulz iterations (Jordan et al. 2024), its
        # step scaled by sqrt(max(1, rows / columns)); no weight decay on these.
        optimizers.append(Muon([group("matrix", decay=False)], momentum=config.muon_momentum,
                               dtype=muon_dtype(config.muon_dtype, torch.device(device_type))))
    return optimizers


def muon_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where the device multiplies it natively, float32 elsewhere, where a bfloat16 matmul is
    emulated: 7x slower than float32 on a CPU without AVX512-BF16, most of a quick start's step."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return DTYPES[name]


# Keller Jordan's quintic Newton-Schulz (the coefficients maximise the slope at zero), as torch.optim.Muon has them
NS_COEFFICIENTS, NS_STEPS, NS_EPS = (3.4445, -4.7750, 2.0315), 5, 1e-7


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update, settings and state (so a checkpoint of either resumes in the other), with
    three differences. The Newton-Schulz iterations run in `dtype`, not always bfloat16. Matrices of one
    shape are orthogonalised together, in one batched product per iteration. And a matrix sharded by FSDP
    (a DTensor) is orthogonalised whole: its update is gathered, orthogonalised on every rank, and each
    rank keeps its own rows, so the step is the one-process step (the shards alone would each be
    orthogonalised apart, which is another update)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, *, dtype: torch.dtype = torch.bfloat16):
        # the same group keys as torch.optim.Muon's, whose load_state_dict takes the saved groups as they are
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                                  "ns_coefficients": NS_COEFFICIENTS, "eps": NS_EPS, "ns_steps": NS_STEPS,
                                  "adjust_lr_fn": None})
        self.dtype = dtype  # not state: a run resumed on other hardware may choose another
        if any(p.dim() != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon takes 2-D matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"Muon's adjust_lr_fn={group['adjust_lr_fn']} is not supported here")
            by_shape = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for params in by_shape.values():
                self._step_matrices(params, group)
        return loss

    def _step_matrices(self, params: list[nn.Parameter], group: dict) -> None:
        """One step of same-shaped matrices, orthogonalised as one batch."""
        momentum, lr = group["momentum"], group["lr"]
        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)  # a DTensor shard where the gradient is one
            grad, buffer = _local(p.grad), _local(state["momentum_buffer"])
            buffer.lerp_(grad, 1 - momentum)
            updates.append(grad.lerp(buffer, momentum) if group["nesterov"] else buffer)
        whole = _gathered(torch.stack(updates), like=params[0])
        orthogonal = newton_schulz(whole, dtype=self.dtype, coefficients=group["ns_coefficients"],
                                   steps=group["ns_steps"], eps=group["eps"])
        rows, columns = params[0].shape  # the whole matrix's, also for a shard
        scale = math.sqrt(max(1, rows / columns))  # the same update RMS in tall and wide matrices
        for p, update in zip(params, _own_shard(orthogonal, like=params[0]).unbind()):
            weight = _local(p)
            weight.mul_(1 - lr * group["weight_decay"])
            weight.add_(update, alpha=-lr * scale)


def newton_schulz(g: torch.Tensor, *, dtype: torch.dtype, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """A stack of matrices (n, rows, columns), each pushed towards the nearest orthogonal one: its singular
    values to about 1 (0.7 to 1.2), its singular vectors kept. Each is first divided by its Frobenius norm,
    which bounds its spectral norm by 1, where the iteration converges; a tall matrix is iterated
    transposed, so the Gram matrices are the small side squared."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b A + c A²) x
    return x.mT if tall else x


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view: writing to it writes to the DTensor), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _stacked_placements(p: DTensor) -> list:
    """The placements of a stack of matrices sharded as `p` is: each matrix dimension moves up by one."""
    return [Shard(placement.dim + 1) if isinstance(placement, Shard) else placement for placement in p.placements]


def _gathered(stack: torch.Tensor, like: nn.Parameter) -> torch.Tensor:
    """The whole matrices of a stack of this rank's shards (of matrices sharded as `like`), in one
    collective; a stack of whole matrices as it is."""
    if not isinstance(like, DTensor):
        return stack
    shape = (len(stack), *like.shape)
    stride = (like.shape.numel(), *like.stride())
    return DTensor.from_local(stack, like.device_mesh, _stacked_placements(like), run_check=False, shape=shape,
                              stride=stride).full_tensor()


def _own_shard(whole: torch.Tensor, like: nn.Parameter) -> torch.Tensor:
    """This rank's shards of a stack of whole matrices (the same on every rank), cut as `like` is: no
    collective, only a slice."""
    return own_slice(whole, like.device_mesh, _stacked_placements(like)) if isinstance(like, DTensor) else whole


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """The fraction of each group's peak learning rate at `step`: a linear warm-up, then cosine to
    min_lr / learning_rate at lr_decay_iters, or, with lr_schedule=wsd, the peak held until the last
    decay_fraction of lr_decay_iters and a linear decay from there; flat after lr_decay_iters."""
    floor = config.min_lr / config.learning_rate
    if step < config.warmup_iters:
        return (step + 1) / (config.warmup_iters + 1)
    if not config.decay_lr:
        return 1.0
    if step >= config.lr_decay_iters:
        return floor
    start = config.decay_start()
    progress = max(0, step - start) / max(1, config.lr_decay_iters - start)
    if config.lr_schedule == "wsd":
        return 1.0 - progress * (1.0 - floor)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)


def set_lr(optimizers: list[torch.optim.Optimizer], config: TrainConfig, multiplier: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = peak_lr(group["role"], config) * multiplier
