"""A feature whose optional extra is missing stops at start-up with one line naming the `pip install`."""

import sys

import pytest

from gptrain import cli
from gptrain.config import ConfigError, TrainConfig
from gptrain.distributed import DistInfo
from gptrain.extras import require
from gptrain.metrics import MetricsLogger
from gptrain.tokenizer import TokenizerError, from_meta, get_tokenizer

DATA = 'pip install "gptrain[data]"'


def test_require_returns_the_module_or_raises_the_callers_error(monkeypatch):
    assert require("json", "data", "reading JSON", error=ValueError) is sys.modules["json"]
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what `import` meets when it is not installed
    with pytest.raises(RuntimeError) as error:
        require("pyarrow.parquet", "data", "reading .parquet files", error=RuntimeError)
    assert str(error.value) == f"reading .parquet files needs the pyarrow package: {DATA}"


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("tokenizers", ["--input", "{tmp}/a.txt", "--tokenizer", "bpe"], "the bpe tokenizer needs the tokenizers package"),
        ("tokenizers", ["--input", "{tmp}/a.txt", "--tokenizer", "hf:gpt2"],
         "the hf:gpt2 tokenizer needs the tokenizers package"),
        # the tokenizer is checked before a hub dataset is downloaded for it
        ("tokenizers", ["--dataset", "Skylion007/openwebtext", "--tokenizer", "bpe"],
         "the bpe tokenizer needs the tokenizers package"),
        ("datasets", ["--dataset", "Skylion007/openwebtext"], "--dataset needs the datasets package"),
        ("datasets", ["--input", "{tmp}/saved"], "--input {tmp}/saved (a saved dataset) needs the datasets package"),
        ("pyarrow.parquet", ["--input", "{tmp}"], "reading .parquet files needs the pyarrow package"),
    ],
)
def test_prepare_without_an_extra_stops_with_one_line(tmp_path, capsys, monkeypatch, module, argv, message):
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "b.parquet").write_bytes(b"")  # never opened: the check comes first
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit) as exit:
        cli.main(["prepare", *[a.format(tmp=tmp_path) for a in argv], "--out_dir", str(tmp_path / "out")])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(tmp=tmp_path)}: {DATA}\n"
    assert not (tmp_path / "out").exists()


def test_a_saved_bpe_tokenizer_without_tokenizers_is_a_tokenizer_error(monkeypatch):
    pytest.importorskip("tokenizers")  # to train the tokenizer whose checkpoint then meets its absence
    meta = get_tokenizer("bpe", ["to be or not to be"], vocab_size=260).meta()  # as a checkpoint stores it
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(TokenizerError) as error:  # `gptrain generate` prints these as one line
        from_meta(meta)
    assert str(error.value) == f"the bpe tokenizer needs the tokenizers package: {DATA}"


def test_wandb_log_without_wandb_stops_every_rank(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = TrainConfig(log_dir=str(tmp_path / "logs"), wandb_log=True)
    for rank in (0, 1):
        with pytest.raises(ConfigError, match=r'^wandb_log=true needs the wandb package: pip install "gptrain\[wandb\]"$'):
            MetricsLogger(config, DistInfo(rank=rank, world_size=2))
    assert not (tmp_path / "logs").exists()


def test_train_with_wandb_log_but_no_wandb_stops_with_one_line(char_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit) as exit:
        cli.main([
            "train", f"data_dir={char_data}", f"out_dir={tmp_path / 'out'}", f"log_dir={tmp_path / 'logs'}",
            "n_layer=1", "n_head=1", "n_embd=8", "block_size=8", "device=cpu", "dtype=float32", "compile=false",
            "wandb_log=true",
        ])
    assert exit.value.code == 2
    assert capsys.readouterr().err == 'error: wandb_log=true needs the wandb package: pip install "gptrain[wandb]"\n'
