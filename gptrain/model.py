"""The GPT model, top to bottom, in one file.

With every switch at its default this is GPT-2: parameter names and shapes match OpenAI's (wte, wpe,
h.N.attn.c_attn, ...), so its weights map onto this model one to one (the Hugging Face copy stores its
Conv1D weights transposed). The switches of a more recent recipe (rotary positions, RMSNorm, QK-norm,
ReLU² or SwiGLU, an untied head, logit soft-capping, zero-initialised projections) are each picked once,
in a constructor, as the module that does the work; `forward` reads the same for every combination.
Nothing here knows about ranks, checkpoints or the training loop.

Training builds the model on the meta device (no memory, no work), shards or places it, then fills it:
`init_weights` or a checkpoint. Built anywhere else, `GPT(config)` is initialised at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from gptrain.config import GPTConfig


class KVCache:
    """Keys and values of the tokens seen so far, per layer, in (B, n_head, block_size, head_dim) buffers,
    every row at the same position. Positions and attention masks are the cache's business: the model asks
    it where the new tokens sit and what they may attend to (gptrain.batching's cache, whose rows sit at
    different positions, answers the same questions).

    It lives for one generation call, so it never lands in a checkpoint. Buffers are allocated on first
    use, in the dtype the keys arrive in (autocast may make that bfloat16).
    """

    def __init__(self, config: GPTConfig):
        self.block_size = config.block_size
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.values: list[torch.Tensor | None] = [None] * config.n_layer
        self.length = 0  # tokens cached; advanced once all layers have written

    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        """The positions (1, new) of the tokens about to be added."""
        assert self.length + new <= self.block_size, f"sequence of {self.length + new} exceeds block_size {self.block_size}"
        return torch.arange(self.length, self.length + new, device=device)[None]

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Store this step's keys and values; return every cached one, this step's included, with the mask
        and causal flag for scaled_dot_product_attention."""
        if self.keys[layer] is None:
            shape = (k.size(0), k.size(1), self.block_size, k.size(3))
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        new, end = k.size(2), self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        keys, values = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        if self.length == 0 or new == 1:  # a prefill is plainly causal; one new token sees every cached one
            return keys, values, None, self.length == 0
        # a chunk after cached tokens: query i, at position length + i, sees the keys up to it; as a causal bias
        # aligned to the lower right, which SDPA's fused GPU kernels take where they refuse a mask tensor
        return keys, values, causal_lower_right(new, end), False

    def advance(self, new: int) -> None:
        self.length += new


class Unchanged(nn.Module):
    """A switch turned off: passes its input through (and takes, unused, what the switch's module takes)."""

    def forward(self, x: torch.Tensor, *unused) -> torch.Tensor:
        return x


class LearnedPositions(nn.Embedding):
    """GPT-2's positions: a learned vector for each position, added to the token embeddings."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + super().forward(positions)


def rope_table(config: GPTConfig) -> torch.Tensor:
    """cos and sin of every position's rotation angles, (2, block_size, head_dim / 2): the pairs (i, i + d/2)
    of each head's dimensions turn at frequencies theta^(-2i/d), as in Llama (RoFormer, Su et al. 2021)."""
    head_dim = config.n_embd // config.n_head
    frequencies = config.rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), frequencies)
    return torch.stack([angles.cos(), angles.sin()])


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (..., T, head_dim) by their positions' angles (2, ..., T, head_dim / 2)."""
    cos, sin = rope.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Rotary(nn.Module):
    """Rotary positions: queries and keys turned by angles that grow with their position, so attention
    scores depend on how far apart two tokens are, not where they sit."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.register_buffer("table", rope_table(config), persistent=False)  # recomputed, never saved

    def reset_table(self) -> None:
        """Compute the table in place: after to_empty(), a model built on the meta device holds garbage here."""
        self.table.copy_(rope_table(self.config))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # positions (B or 1, T) pick (2, B or 1, T, d/2) angles; the axis added after B spans the heads
        return rotate(x, self.table[:, positions].unsqueeze(2))


def norm(config: GPTConfig) -> nn.Module:
    """GPT-2's LayerNorm, or RMSNorm: a gain without a bias, and no mean subtracted."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm: unit-RMS queries and keys (no gain), so attention logits cannot grow without bound
        head_dim = config.n_embd // config.n_head
        self.qk_norm = nn.RMSNorm(head_dim, eps=1e-5, elementwise_affine=False) if config.qk_norm else nn.Identity()
        self.rotary = Rotary(config) if config.pos_emb == "rope" else Unchanged()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = self.rotary(self.qk_norm(q), positions), self.rotary(self.qk_norm(k), positions)
        mask, causal = None, True
        if cache is not None:  # it keeps the keys as they are now: normalised and rotated
            k, v, mask, causal = cache.attend(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class ReLU2(nn.Module):
    """relu(x)²: sparse like ReLU, with a gradient that grows with its input (Primer, So et al. 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class SwiGLU(nn.Module):
    """silu(gate) * up, with c_fc computing gate and up side by side (Shazeer 2020; Llama's MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def mlp_width(config: GPTConfig) -> int:
    """GPT-2's 4 x n_embd; SwiGLU's three matrices take 8/3 x n_embd (rounded up to a multiple of 64)
    for about as many parameters as two matrices of 4 x n_embd."""
    return 4 * config.n_embd if config.mlp != "swiglu" else -(-8 * config.n_embd // 3 // 64) * 64


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        width = mlp_width(config)
        self.c_fc = nn.Linear(config.n_embd, 2 * width if config.mlp == "swiglu" else width, bias=config.bias)
        self.act = {"gelu": nn.GELU(approximate="tanh"), "relu2": ReLU2(), "swiglu": SwiGLU()}[config.mlp]
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm: normalise the input of each sub-layer, keep the residual stream untouched."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, cache, layer)
        return x + self.mlp(self.ln_2(x))


class SoftCap(nn.Module):
    """Logits squashed smoothly into (-cap, cap), so none can run away (Gemma 2)."""

    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(logits.float() / self.cap)


def _copy(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None, "vocab_size must be resolved before building the model"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            # learned absolute positions (GPT-2); rotary positions turn queries and keys in attention instead
            wpe=LearnedPositions(config.block_size, config.n_embd) if config.pos_emb == "learned" else Unchanged(),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.softcap = SoftCap(config.logit_softcap) if config.logit_softcap is not None else Unchanged()
        self._tie()
        if self.lm_head.weight.device.type != "meta":  # built for use at once: seeded by torch's global generator
            self.init_weights(int(torch.randint(0, 2**62, ())))

    def _tie(self) -> None:
        if self.config.tie_embeddings:  # one matrix reads tokens in and out, as in GPT-2
            self.lm_head.weight = self.transformer.wte.weight

    def to_empty(self, *, device: torch.device | str, recurse: bool = True) -> GPT:
        """Storage on `device` for a model built on the meta device, left for init_weights or a checkpoint to
        fill. A tied head is tied again (to_empty gives each module a tensor of its own) and the rotary
        tables, computed rather than learned, are computed."""
        super().to_empty(device=device, recurse=recurse)
        if self.lm_head.weight is not self.transformer.wte.weight:
            self._tie()
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, Rotary):
                    module.reset_table()
        return self

    @torch.no_grad()
    def init_weights(self, seed: int, place: Callable[[torch.Tensor, torch.Tensor], None] = _copy) -> None:
        """GPT-2's initialisation: weights from N(0, 0.02), biases 0, norm gains 1; the projections that
        write into the residual stream scaled by 1/sqrt(2 * n_layer), so the stream's variance does not grow
        with depth, or, with zero_init_proj, zero, so every block starts as the identity (modded-nanogpt).

        Each parameter is drawn whole, on the CPU, from one generator seeded with `seed`, in a fixed order:
        the seed alone decides the weights, on any device and however they are laid out. `place` copies a
        drawn value into its parameter; gptrain.distributed passes one that keeps a shard's slice."""
        generator = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                value = torch.zeros(p.shape)
            elif p.dim() == 1:  # a norm's gain
                value = torch.ones(p.shape)
            elif name.endswith("c_proj.weight") and self.config.zero_init_proj:
                value = torch.zeros(p.shape)
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                value = torch.empty(p.shape).normal_(0.0, std, generator=generator)
            place(p, value)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counting a tied embedding once; without the lookup tables by default, since a
        lookup costs no FLOPs: the position table, and wte unless it is the output projection too."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.transformer.wpe.parameters())
            n -= 0 if self.config.tie_embeddings else self.transformer.wte.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position (or only the last, when generating) and the mean cross-entropy loss."""
        B, T = idx.shape
        if cache is None:
            assert T <= self.config.block_size, f"sequence of {T} exceeds block_size {self.config.block_size}"
            positions = torch.arange(T, device=idx.device)[None]
        else:  # a row of the cache may sit at its own position (gptrain.batching)
            positions = cache.positions(T, idx.device)
        x = self.transformer.drop(self.transformer.wpe(self.transformer.wte(idx), positions))
        for i, block in enumerate(self.transformer.h):
            x = block(x, positions, cache, i)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.advance(T)
        if targets is None:
            return self.softcap(self.lm_head(x[:, [-1], :])), None  # generation needs only the last position
        logits = self.softcap(self.lm_head(x))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight in a matmul plus attention's
        QK^T and AV over the full context, counted as dense (PaLM, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size
