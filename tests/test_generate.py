from pathlib import Path

import pytest
import torch

from gptrain.config import GPTConfig
from gptrain.generate import StreamDecoder, generate_tokens, main, nucleus, sample_generators, sample_next
from gptrain.model import GPT
from gptrain.tokenizer import HFTokenizer, get_tokenizer
from gptrain.train import train


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


@pytest.fixture
def checkpoint(tiny_config, tmp_path):
    train(tiny_config("max_iters=10", "eval_interval=10"))
    return tmp_path / "out" / "ckpt.pt"


def sample(capsys, checkpoint, *args) -> str:
    capsys.readouterr()  # drop what training printed
    main(["--model_path", str(checkpoint), "--prompt", "ROMEO:", "--max_new_tokens", "40", "--device", "cpu", *args])
    return capsys.readouterr().out


def test_seed_makes_sampling_reproducible(capsys, checkpoint):
    a, b = sample(capsys, checkpoint, "--seed", "7"), sample(capsys, checkpoint, "--seed", "7")
    c = sample(capsys, checkpoint, "--seed", "8")
    assert a == b != c
    assert len(a.rstrip("\n")) >= 30  # characters: 40 char-level tokens, decoded with the checkpoint's tokenizer


def samples(capsys, checkpoint, n: int, *args) -> list[str]:
    out = sample(capsys, checkpoint, "--num_samples", str(n), *args)
    assert out.endswith("\n")
    return out[:-1].split("\n" + "-" * 40 + "\n")


def test_num_samples_and_greedy(capsys, checkpoint):
    first, second = samples(capsys, checkpoint, 2, "--temperature", "0", "--top_p", "0.9")
    assert first == second  # greedy ignores the seed


def test_sample_i_is_the_same_for_any_num_samples(capsys, checkpoint):
    four = samples(capsys, checkpoint, 4, "--seed", "7")
    assert len(set(four)) == 4 and all(len(s) >= 30 for s in four)
    assert samples(capsys, checkpoint, 1, "--seed", "7") == four[:1]
    assert samples(capsys, checkpoint, 3, "--seed", "7") == four[:3]
    assert len(set(samples(capsys, checkpoint, 2))) == 2  # without a seed too, each sample has its own stream


def test_bad_arguments_are_one_line_errors(capsys, checkpoint, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--model_path", str(tmp_path / "missing.pt")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint not found: {tmp_path / 'missing.pt'}"
    with pytest.raises(SystemExit):
        sample(capsys, checkpoint, "--top_p", "0")
    assert "0 < --top_p <= 1" in capsys.readouterr().err


def test_a_prompt_outside_a_char_vocabulary_is_a_one_line_error(capsys, checkpoint):
    with pytest.raises(SystemExit):
        sample(capsys, checkpoint, "--prompt", "ROMEO: 日本")
    assert capsys.readouterr().err.strip().startswith("error: character '日' is not in")


SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # nanoGPT's 65


def nanogpt_checkpoint(path) -> None:
    """A checkpoint as nanoGPT's train.py writes it for shakespeare_char: no tokenizer, a compiled model's
    parameter names, model_args and its config dict (optimizer left out: generation does not read it)."""
    model_args = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "bias": False, "vocab_size": 65,
                  "dropout": 0.0}
    model = GPT(GPTConfig(**model_args))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "model_args": model_args, "iter_num": 5000, "best_val_loss": 1.47,
                "config": {"dataset": "shakespeare_char", "batch_size": 64}}, path)


def nanogpt_meta(folder) -> None:
    import pickle

    folder.mkdir(parents=True)
    itos = dict(enumerate(SHAKESPEARE_CHARS))
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)


def greedy(capsys, checkpoint, *args) -> tuple[str, str]:
    capsys.readouterr()
    main(["--model_path", str(checkpoint), "--prompt", "ROMEO:", "--max_new_tokens", "30", "--device", "cpu",
          "--temperature", "0", *args])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_a_nanogpt_char_checkpoint_decodes_with_its_datasets_meta_pkl(capsys, tmp_path, monkeypatch):
    nanogpt_checkpoint(tmp_path / "ckpt.pt")
    nanogpt_meta(tmp_path / "data" / "shakespeare_char")
    monkeypatch.chdir(tmp_path)  # nanoGPT's sample.py reads data/<dataset>/meta.pkl from where it runs
    out, err = greedy(capsys, tmp_path / "ckpt.pt")
    assert len(out) == 31 and set(out) <= set(SHAKESPEARE_CHARS)  # 30 characters, then the final newline
    assert err == "note: using the 'char' tokenizer of data/shakespeare_char/meta.pkl\n"


def test_meta_points_at_a_vocabulary_kept_elsewhere(capsys, tmp_path, monkeypatch):
    nanogpt_checkpoint(tmp_path / "ckpt.pt")
    nanogpt_meta(tmp_path / "elsewhere")
    nanogpt_meta(tmp_path / "data" / "shakespeare_char")
    monkeypatch.chdir(tmp_path)
    expected, _ = greedy(capsys, tmp_path / "ckpt.pt")
    for meta in (tmp_path / "elsewhere", tmp_path / "elsewhere" / "meta.pkl"):
        out, err = greedy(capsys, tmp_path / "ckpt.pt", "--meta", str(meta))
        assert out == expected and str(tmp_path / "elsewhere" / "meta.pkl") in err
    monkeypatch.chdir(tmp_path / "elsewhere")  # no data/ here: --meta alone finds it
    assert greedy(capsys, tmp_path / "ckpt.pt", "--meta", "meta.pkl")[0] == expected


def test_without_a_vocabulary_a_nanogpt_char_checkpoint_is_refused_naming_meta(capsys, tmp_path, monkeypatch):
    nanogpt_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        greedy(capsys, tmp_path / "ckpt.pt")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'ckpt.pt'} records no tokenizer and its vocabulary is too small "
                          f"for GPT-2's") and "--meta" in err
    with pytest.raises(SystemExit):
        greedy(capsys, tmp_path / "ckpt.pt", "--meta", str(tmp_path / "nowhere"))
    assert capsys.readouterr().err.startswith(f"error: --meta {tmp_path / 'nowhere'}: not a meta.json")


def test_a_meta_pkl_that_would_run_code_is_refused(capsys, tmp_path, monkeypatch):
    import pickle

    nanogpt_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "meta.pkl").write_bytes(pickle.dumps({"itos": Path}))  # a class: a global
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        greedy(capsys, tmp_path / "ckpt.pt", "--meta", str(tmp_path / "evil"))
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read {tmp_path / 'evil' / 'meta.pkl'}: meta.pkl refers to ")
