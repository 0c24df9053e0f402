"""Properties, checked on generated inputs: the `key=value` parser gives back each typed value and names every
unknown key in one line; the top-k / top-p filter keeps the smallest set of most likely tokens reaching p."""

from dataclasses import fields

import pytest
import torch

from gptrain.config import ConfigError, TrainConfig, load_config
from gptrain.sampling import nucleus, sample_generators, sample_next

pytest.importorskip("hypothesis")  # gptrain[dev]
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

QUICK = settings(max_examples=60, deadline=None, database=None)  # database=None: no .hypothesis/ folder
# text as typed on a command line: any character but '$' (OmegaConf reads ${...} as an interpolation)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="$"), min_size=1, max_size=20)
FLOATS = {"min_value": 0.0, "max_value": 1e12, "allow_nan": False, "allow_infinity": False}


def quoted(text: str) -> bool:
    return len(text) > 1 and text[0] == text[-1] and text[0] in "'\""  # YAML's quotes, read as such


# settings of each declared type, with values their validation accepts
VALUES = {
    "seed": st.integers(-(2**40), 2**40),  # int
    "eval_iters": st.integers(1, 10**9),  # int > 0
    "weight_decay": st.floats(**FLOATS),  # float >= 0
    "grad_clip": st.floats(**FLOATS) | st.integers(0, 10**6).map(float),  # written as 3 or 3.0: a float either way
    "dropout": st.floats(0.0, 1.0, exclude_max=True),
    "bias": st.booleans(),
    "decay_lr": st.booleans(),
    "compile": st.booleans() | st.just("auto"),  # bool or auto
    "wandb_project": TEXT.filter(lambda t: not quoted(t)),  # str, taken as typed
    "sample_prompt": TEXT.filter(lambda t: not quoted(t)),
    "run_name": st.none() | TEXT.filter(lambda t: not quoted(t) and t not in ("null", "~")),  # str or null
    "vocab_size": st.none() | st.integers(1, 10**7),  # int or null
    "logit_softcap": st.none() | st.floats(min_value=1e-6, max_value=1e6),  # float or null
}


def spelled(value, draw) -> str:
    """How a user might type `value` after `key=`."""
    if value is None:
        return draw(st.sampled_from(["null", "~", "Null"]))
    if isinstance(value, bool):
        return draw(st.sampled_from([str(value).lower(), str(value), str(value).upper()]))
    if isinstance(value, float):
        return draw(st.sampled_from([repr(value), f"{value:.17g}", f"{value:e}" if float(f"{value:e}") == value
                                     else repr(value)]))
    return str(value)


@QUICK
@given(st.data())
def test_key_value_gives_back_the_typed_value(data):
    key = data.draw(st.sampled_from(sorted(VALUES)))
    value = data.draw(VALUES[key])
    text = spelled(value, data.draw)
    config = load_config([f"{key}={text}"])
    got = getattr(config, key)
    assert got == value and type(got) is type(value), (text, got)


KEYS = {f.name for f in fields(TrainConfig)}


@settings(max_examples=40, deadline=None, database=None)
@given(st.text(min_size=1, max_size=30).filter(lambda k: "=" not in k and k.removeprefix("--") not in KEYS
                                               and not k.startswith("--")),
       st.sampled_from(["1", "x", "null", "[1, 2]", ""]))
def test_an_unknown_key_is_one_line_naming_it(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(["n_layer=4", f"{key}={value}"])
    message = str(e.value)
    assert "\n" not in message and "\r" not in message
    assert f"unknown key {key!r} in command line" in message


LOGITS = st.lists(st.floats(-30, 30, allow_nan=False), min_size=1, max_size=40)


def as_tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@QUICK
@given(LOGITS, st.floats(0.0, 1.0, exclude_min=True))
def test_nucleus_keeps_the_smallest_most_likely_set_reaching_p(values, top_p):
    logits = as_tensor(values)
    original = logits.clone()
    filtered = nucleus(logits, top_p)
    assert torch.equal(logits, original)  # the input is left as it was
    kept = torch.isfinite(filtered)
    assert kept.any()  # never empty
    assert torch.equal(filtered[kept], logits[kept])  # each kept logit keeps its value and its place
    probs = torch.softmax(logits, dim=-1)
    if (~kept).any():  # a prefix of the tokens sorted by probability: no dropped token beats a kept one
        assert probs[~kept].max() <= probs[kept].min()
    mass = probs[kept].sum().item()
    assert mass >= top_p - 1e-9  # reaches p
    assert mass - probs[kept].min().item() < top_p + 1e-9  # and without its least likely token would not


@settings(max_examples=30, deadline=None, database=None)
@given(st.lists(st.floats(-30, 30, allow_nan=False), min_size=2, max_size=8), st.integers(1, 8))
def test_nucleus_treats_each_row_alone(first, rows):
    batch = as_tensor(first).expand(rows, -1).clone()
    batch[1:] = batch[1:].flip(-1)  # other orders of the same logits
    top_p = 0.7
    assert torch.equal(torch.isfinite(nucleus(batch, top_p))[0], torch.isfinite(nucleus(as_tensor(first), top_p)))
    for i in range(rows):
        assert torch.equal(nucleus(batch, top_p)[i], nucleus(batch[i], top_p))


@settings(max_examples=30, deadline=None, database=None)
@given(st.lists(st.floats(-10, 10, width=32), min_size=2, max_size=30, unique=True), st.integers(0, 40),
       st.floats(1e-300, 1.0), st.integers(0, 2**32))
def test_sampling_draws_only_inside_top_k_then_the_nucleus(values, top_k, top_p, seed):
    logits = torch.tensor([values])  # float32, as sample_next computes, so that the reference sorts alike
    candidates = logits[0] if not 0 < top_k < len(values) else torch.topk(logits[0], top_k).values
    allowed = {values.index(v) for v in candidates[torch.isfinite(nucleus(candidates, top_p))].tolist()}
    n = 8
    drawn = sample_next(logits.expand(n, -1), 1.0, top_k or None, top_p, sample_generators(n, seed, torch.device("cpu")))
    assert drawn.shape == (n, 1) and set(drawn.flatten().tolist()) <= allowed


def test_a_top_p_too_small_for_float32_still_keeps_the_most_likely_token():
    assert torch.isfinite(nucleus(torch.tensor([0.0, 1.0]), 1e-50)).tolist() == [False, True]
