import pytest
import torch

from gptrain.config import GPTConfig
from gptrain.model import GPT
from gptrain.sampling import StreamDecoder, generate_tokens, nucleus, sample_generators, sample_next
from gptrain.tokenizer import HFTokenizer, get_tokenizer

def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def drawn(logits: torch.Tensor, top_k: int | None, top_p: float | None, n: int = 300) -> set[int]:
    """The tokens that n seeded draws from one row of logits take."""
    rows = logits.expand(n, -1)
    return set(sample_next(rows, 1.0, top_k, top_p, sample_generators(n, 0, torch.device("cpu"))).flatten().tolist())


def test_top_k_draws_only_among_the_k_most_likely():
    logits = torch.tensor([[0.1, 0.9, -0.1, 0.6, 0.3]])
    assert drawn(logits, top_k=2, top_p=None) == {1, 3}
    assert drawn(logits, top_k=0, top_p=None) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("top_p, expected", [(0.4, [0]), (0.5, [0]), (0.7, [0, 1]), (0.75, [0, 1]), (0.8, [0, 1, 2]),
                                             (0.99, [0, 1, 2, 3, 4])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    logits = probs.log()[[3, 0, 4, 1, 2]]  # shuffled: positions 1, 3, 4, 0, 2 hold the ranked tokens
    ranked = [1, 3, 4, 0, 2]
    assert kept(nucleus(logits, top_p)) == sorted(ranked[i] for i in expected)


def test_top_k_and_top_p_combine():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # the top 3 hold 66.5%, 24.5% and 9% of their probability
    assert drawn(logits, top_k=3, top_p=0.9) == {0, 1}
    assert drawn(logits, top_k=3, top_p=None) == {0, 1, 2}


def tiny_model(**switches) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, **switches)).eval()


# every model switch on at once
MODERN = {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "tie_embeddings": False,
          "logit_softcap": 15.0}


def diverse_model(**switches) -> GPT:
    """A tiny model with large random weights: unlike a freshly initialised one, whose greedy output soon
    repeats one token whatever the prompt, its continuations differ from prompt to prompt."""
    model = tiny_model(**switches)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def generated(model: GPT, prompt: torch.Tensor, **kwargs) -> torch.Tensor:
    # 40 new tokens overflow the 16-token context, exercising the cropped recompute too
    return torch.cat(list(generate_tokens(model, prompt, 40, **kwargs)), dim=1)


def distinct_rows(tokens: torch.Tensor) -> int:
    return len({tuple(row) for row in tokens.tolist()})


@pytest.mark.parametrize("switches", [{}, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_kv_cache_equals_recomputing_the_context(temperature, switches):
    model, prompt = diverse_model(**switches), torch.randint(0, 64, (4, 5))
    run = lambda cache: generated(model, prompt, temperature=temperature, use_cache=cache,  # noqa: E731
                                  generators=sample_generators(4, 3, torch.device("cpu")) if temperature else None)
    cached = run(True)
    assert distinct_rows(cached) == 4
    assert torch.equal(cached, run(False))


def test_a_batch_decodes_each_row_as_it_would_alone():
    model, prompt = diverse_model(), torch.randint(0, 64, (4, 5))
    batched = generated(model, prompt, temperature=0)
    assert distinct_rows(batched) == 4  # so rows mixed up in the batch would show
    for i in range(4):
        assert torch.equal(batched[i:i + 1], generated(model, prompt[i:i + 1], temperature=0))


def test_sample_i_draws_the_same_tokens_in_any_batch():
    model, prompt = diverse_model(), torch.randint(0, 64, (1, 5)).expand(4, -1)
    batched = generated(model, prompt, temperature=0.8, top_k=40, top_p=0.95,
                        generators=sample_generators(4, 7, torch.device("cpu")))
    assert distinct_rows(batched) == 4  # the same prompt, four different samples
    for i in range(4):
        alone = generated(model, prompt[:1], temperature=0.8, top_k=40, top_p=0.95,
                          generators=sample_generators(i + 1, 7, torch.device("cpu"))[i:])
        assert torch.equal(batched[i:i + 1], alone)
    other_seed = generated(model, prompt, temperature=0.8, top_k=40, top_p=0.95,
                           generators=sample_generators(4, 8, torch.device("cpu")))
    assert not torch.equal(batched, other_seed)


def test_prompt_longer_than_the_context_is_cropped_from_the_left():
    model = tiny_model()
    long_prompt = torch.randint(0, 64, (1, 50))
    first = lambda p: next(generate_tokens(model, p, 1, temperature=0))  # noqa: E731
    assert torch.equal(first(long_prompt), first(long_prompt[:, -16:]))


@pytest.mark.parametrize("top_k", [None, 20])
def test_padded_vocabulary_is_never_sampled(top_k):
    model = tiny_model()
    tokens = torch.cat(list(generate_tokens(model, torch.zeros(4, 1, dtype=torch.long), 30, temperature=2.0,
                                            top_k=top_k, vocab_limit=10)), 1)
    assert int(tokens.max()) < 10


def streamed(tok, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tok)
    return [decoder.push(t) for t in ids] + [decoder.flush()]


def test_stream_decoder_waits_for_whole_utf8_characters():
    tok = get_tokenizer("gpt2")
    text = "naïve café → 日本語 🙂!\nsecond line"
    pieces = streamed(tok, tok.encode(text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_keeps_sentencepiece_spaces():
    pytest.importorskip("tokenizers")  # gptrain[data]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()  # as Llama's tokenizers
    sp.train_from_iterator(["hello world the quick brown fox"] * 20, trainers.BpeTrainer(vocab_size=60))
    tok = HFTokenizer("hf:test", sp.to_str(), None)
    ids = tok.encode("hello world the quick brown fox")
    assert "".join(streamed(tok, ids)) == tok.decode(ids) == "hello world the quick brown fox"


def test_one_uniform_a_row_draws_each_token_as_often_as_its_probability():
    """20,000 rows of the same distribution, each drawn from its own generator: the tokens come in proportion
    to their probabilities (to 1%), and a token of probability 0 never."""
    probs = torch.tensor([0.5, 0.25, 0.0, 0.125, 0.0625, 0.0625])
    n = 20_000
    tokens = sample_next(probs.log().expand(n, -1), 1.0, None, None, sample_generators(n, 0, torch.device("cpu")))
    share = torch.bincount(tokens.flatten(), minlength=len(probs)) / n
    assert share[2] == 0 and torch.allclose(share, probs, atol=0.01), share

