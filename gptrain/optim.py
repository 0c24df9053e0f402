"""The optimizers and the learning-rate schedule.

Parameters are grouped by role, each group with its own peak learning rate: the embeddings, an untied
output head, the blocks' 2-D matrices, and the vectors (norm gains, biases). With optimizer=muon the
matrices go to Muon and the rest stay with AdamW. The schedule is one multiplier applied to every
group's peak, so all groups warm up and decay together.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gptrain.config import ConfigError, TrainConfig


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
        optimizers.append(torch.optim.Muon([group("matrix", decay=False)], momentum=config.muon_momentum,
                                           nesterov=True))
    return optimizers


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
