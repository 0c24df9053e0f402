import math

import pytest
import torch

from gptrain.config import GPTConfig
from gptrain.model import GPT, KVCache


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 64,
                            "dropout": 0.0, **overrides})).eval()


def test_gpt2_small_has_gpt2s_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257))
    assert model.num_params(non_embedding=False) == 124_439_808  # OpenAI GPT-2 small, tied embeddings


def test_parameter_names_and_shapes_match_hugging_face_gpt2():
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=64))
    theirs = {k: v.shape for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    ours = {k: v.shape for k, v in tiny().state_dict().items()}
    assert set(ours) == set(theirs)
    for name, shape in ours.items():
        # HF stores its Conv1D weights transposed; everything else matches as is.
        expected = theirs[name][::-1] if name.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")) else theirs[name]
        assert tuple(shape) == tuple(expected), name


def test_initial_loss_is_that_of_a_uniform_guess():
    model = tiny()
    idx, targets = torch.randint(0, 64, (2, 8, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(64)) < 0.1


def test_tied_embeddings_and_scaled_residual_init():
    model = tiny(n_layer=8)
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.002


def test_kv_cache_logits_equal_full_forward():
    model = tiny()
    idx = torch.randint(0, 64, (2, 12))
    full = torch.cat([model(idx[:, : t + 1])[0] for t in range(12)], dim=1)
    cache = KVCache(model.config)
    steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 4:], rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(AssertionError, match="exceeds block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))
