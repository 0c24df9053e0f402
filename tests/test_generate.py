from pathlib import Path

import pytest
import torch

from gptrain.config import GPTConfig
from gptrain.generate import main
from gptrain.model import GPT
from gptrain.train import train


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
