"""The GPT model, top to bottom, in one file.

With every switch at its default this is GPT-2: parameter names and shapes match OpenAI's (wte, wpe,
h.N.attn.c_attn, ...), so its weights map onto this model one to one (the Hugging Face copy stores its
Conv1D weights transposed). The switches of a more recent recipe (rotary positions, RMSNorm, QK-norm,
ReLU² or SwiGLU, an untied head, logit soft-capping, zero-initialised projections) are each picked once,
in a constructor, and act in a line or two where they apply. Nothing here knows about ranks,
checkpoints or the training loop.
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptrain.config import GPTConfig


class KVCache:
    """Keys and values of the tokens seen so far, per layer, in (B, n_head, block_size, head_dim) buffers.

    It lives for one generation call, so it never lands in a checkpoint. Buffers are allocated on first
    use, in the dtype the keys arrive in (autocast may make that bfloat16).
    """

    def __init__(self, config: GPTConfig):
        self.block_size = config.block_size
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.values: list[torch.Tensor | None] = [None] * config.n_layer
        self.length = 0  # tokens cached; the model advances it after all layers have written
        # Set where the rows hold different numbers of tokens (a server decoding unrelated requests together,
        # gptrain.batching): each new token's own position, and which cached keys each row's queries may see.
        self.positions: torch.Tensor | None = None  # (B, T)
        self.mask: torch.Tensor | None = None  # (B, 1, T, keys), True where a query may attend

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values; return all cached so far, this step's included."""
        if self.keys[layer] is None:
            shape = (k.size(0), k.size(1), self.block_size, k.size(3))
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def norm(config: GPTConfig) -> nn.Module:
    """GPT-2's LayerNorm, or RMSNorm: a gain without a bias, and no mean subtracted."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rope_table(config: GPTConfig) -> torch.Tensor:
    """cos and sin of every position's rotation angles, (2, block_size, head_dim / 2): the pairs (i, i + d/2)
    of each head's dimensions turn at frequencies theta^(-2i/d), as in Llama (RoFormer, Su et al. 2021)."""
    head_dim = config.n_embd // config.n_head
    frequencies = config.rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), frequencies)
    return torch.stack([angles.cos(), angles.sin()])


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, n_head, T, head_dim) by their positions' angles (2, T, head_dim / 2)."""
    cos, sin = rope.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


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

    def forward(self, x: torch.Tensor, *, rope: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = self.qk_norm(q), self.qk_norm(k)
        if rope is not None:  # rotary positions: the cache then holds keys already rotated
            q, k = rotate(q, rope), rotate(k, rope)
        causal, mask = True, None
        if cache is not None:
            causal = cache.length == 0  # one token decoded after the prefill attends to every cached one
            assert causal or T == 1, "after its prefill the cache grows one token at a time"
            k, v = cache.update(layer, k, v)
            mask = cache.mask
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

    def forward(self, x: torch.Tensor, *, rope: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope=rope, cache=cache, layer=layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None, "vocab_size must be resolved before building the model"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            # learned absolute positions (GPT-2), or none here: rotary positions turn queries and keys instead
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos_emb == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # one matrix reads tokens in and out, as in GPT-2
        self.register_buffer("rope", rope_table(config) if config.pos_emb == "rope" else None, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth; zero_init_proj starts them at zero instead,
        # so every block begins as the identity (modded-nanogpt).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counting a tied embedding once; without the lookup tables by default, since a
        lookup costs no FLOPs: the position table, and wte unless it is the output projection too."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            lookups = [self.transformer.wpe] if "wpe" in self.transformer else []
            lookups += [] if self.config.tie_embeddings else [self.transformer.wte]
            n -= sum(table.weight.numel() for table in lookups)
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position (or only the last, when generating) and the mean cross-entropy loss."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        assert start + T <= self.config.block_size, f"sequence of {start + T} exceeds block_size {self.config.block_size}"
        x, rope = self.transformer.wte(idx), None
        rows = cache.positions if cache is not None else None  # (B, T) when rows sit at different positions
        if self.rope is None:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device) if rows is None else rows)
        else:
            # per-row positions (B, T) give a (2, B, T, d/2) table; the axis added after B spans the heads
            rope = self.rope[:, start:start + T] if rows is None else self.rope[:, rows].unsqueeze(2)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope=rope, cache=cache, layer=i)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length += T
        if targets is None:
            return self.logits(x[:, [-1], :]), None  # generation needs only the last position
        logits = self.logits(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection; with logit_softcap, squashed smoothly into (-cap, cap) (Gemma 2)."""
        logits = self.lm_head(x)
        if self.config.logit_softcap is not None:
            logits = self.config.logit_softcap * torch.tanh(logits.float() / self.config.logit_softcap)
        return logits

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight in a matmul plus attention's
        QK^T and AV over the full context, counted as dense (PaLM, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size
