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


MODERN = {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "tie_embeddings": False,
          "logit_softcap": 15.0, "zero_init_proj": True}


def shapes(model: GPT) -> dict:
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


@pytest.mark.parametrize("switch, value", MODERN.items())
def test_each_switch_changes_only_what_it_should(switch, value):
    base, switched = tiny(), tiny(**{switch: value})
    added = set(shapes(switched).items()) - set(shapes(base).items())
    removed = set(shapes(base).items()) - set(shapes(switched).items())
    if switch == "pos_emb":
        assert removed == {("transformer.wpe.weight", (16, 32))} and not added
    elif switch == "norm":  # the LayerNorm biases go; the gains stay, under the same names
        assert not added and {name for name, _ in removed} == {
            f"{prefix}.bias" for prefix in ("transformer.ln_f", *(f"transformer.h.{i}.ln_{j}" for i in range(2) for j in (1, 2)))}
        assert isinstance(switched.transformer.ln_f, torch.nn.RMSNorm)
    elif switch == "mlp":  # SwiGLU: gate and up side by side in c_fc, each 8/3 x 32 rounded up to 128
        assert {(n.split(".", 3)[-1], s) for n, s in added} == {("mlp.c_fc.weight", (256, 32)), ("mlp.c_fc.bias", (256,))}
    else:  # the rest change no shape: qk_norm has no gain, the softcap is a function, zero_init an init
        assert not added and not removed
    if switch == "tie_embeddings":
        assert switched.lm_head.weight is not switched.transformer.wte.weight
        assert switched.num_params(non_embedding=False) == base.num_params(non_embedding=False) + 64 * 32
    if switch == "zero_init_proj":
        assert all(block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
                   for block in switched.transformer.h)
        assert base.transformer.h[0].attn.c_proj.weight.abs().max() > 0
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = switched(idx, idx)
    assert torch.isfinite(loss) and not torch.equal(logits, base(idx, idx)[0])
    if switch == "logit_softcap":
        assert logits.abs().max() < 15.0


def test_relu2_is_relu_squared_and_keeps_shapes():
    model = tiny(mlp="relu2")
    assert shapes(model) == shapes(tiny())
    x = torch.tensor([-2.0, 0.5, 3.0])
    assert torch.equal(model.transformer.h[0].mlp.act(x), torch.tensor([0.0, 0.25, 9.0]))


def test_rope_makes_attention_depend_on_relative_position_only():
    """The same pair of tokens, shifted along the sequence, scores the same under rotary positions."""
    from gptrain.model import rope_table, rotate
    table = rope_table(GPTConfig(n_embd=32, n_head=2, block_size=16))
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)
    score = lambda i, j: (rotate(q, table[:, i:i + 1]) * rotate(k, table[:, j:j + 1])).sum()  # noqa: E731
    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 4))


@pytest.mark.parametrize("overrides", [{"pos_emb": "rope"}, MODERN], ids=["rope", "modern"])
def test_kv_cache_greedy_generation_equals_no_cache(overrides):
    model = tiny(**overrides)
    prompt = torch.randint(0, 64, (3, 4))
    without = prompt
    for _ in range(10):  # no cache: the whole sequence again for every token
        logits, _ = model(without)
        without = torch.cat([without, logits[:, -1:].argmax(-1)], dim=1)
    cache, tokens = KVCache(model.config), prompt
    logits, _ = model(prompt, cache=cache)
    for _ in range(10):
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        logits, _ = model(tokens[:, -1:], cache=cache)
    assert torch.equal(tokens, without)
