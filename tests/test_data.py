import os
import pickle

import numpy as np
import pytest
import torch

from gptrain.data import BatchSampler, DataError, open_tokens, read_meta


def test_targets_are_inputs_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = BatchSampler(tokens, block_size=16, batch_size=4, seed=0).batch(0, 0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)


def test_a_micro_batch_depends_on_seed_step_and_index_alone():
    tokens = np.random.default_rng(0).integers(0, 65, 10_000).astype(np.uint16)
    sampler = BatchSampler(tokens, 32, 8, seed=1337)
    later = [sampler.batch(step, i) for step in (5, 0) for i in range(3)]  # any order, any sampler object
    again = BatchSampler(tokens, 32, 8, seed=1337)
    for (x, y), step_index in zip(later, [(5, 0), (5, 1), (5, 2), (0, 0), (0, 1), (0, 2)]):
        x2, y2 = again.batch(*step_index)
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_steps_indices_and_seeds_draw_different_batches():
    tokens = np.arange(100_000, dtype=np.uint32)
    first = lambda seed, step, index: BatchSampler(tokens, 8, 4, seed).batch(step, index)[0]  # noqa: E731
    assert not torch.equal(first(0, 0, 0), first(0, 0, 1))
    assert not torch.equal(first(0, 0, 0), first(0, 1, 0))
    assert not torch.equal(first(0, 0, 0), first(1, 0, 0))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_windows_read_from_the_file_are_those_of_the_tokens_in_memory(tmp_path, monkeypatch, dtype):
    tokens = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, 80, dtype=dtype)  # windows reach the end
    tokens.tofile(tmp_path / "train.bin")
    from_file = BatchSampler(open_tokens(tmp_path, "train", {"dtype": np.dtype(dtype).name, "vocab_size": 1 << 32}),
                             64, 16, seed=0)
    in_memory = BatchSampler(tokens, 64, 16, seed=0)
    reads, pread = [], os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: reads.append(offset) or pread(fd, n, offset))
    for step in range(5):
        assert all(torch.equal(a, b) for a, b in zip(from_file.batch(step, 0), in_memory.batch(step, 0)))
    assert len(reads) == 5 * 16  # one read per window, none through the memmap


def test_too_little_data_for_a_block_is_a_clear_error(tmp_path):
    np.arange(64, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match=f"{tmp_path / 'train.bin'} holds 64 tokens, too few for block_size 64"):
        BatchSampler(open_tokens(tmp_path, "train", {"dtype": "uint16", "vocab_size": 64}), 64, 1, seed=0)


@pytest.mark.parametrize("recorded", [True, False], ids=["max_id-recorded", "sampled"])
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_file(tmp_path, recorded):
    """prepare records each split's largest id; data without it (nanoGPT's) is checked on a sample."""
    tokens = np.zeros(3_000_000, dtype=np.uint16)
    tokens[2_999_999] = 65  # the very last token: the sample's blocks reach the end of the file
    tokens.tofile(tmp_path / "train.bin")
    meta = {"dtype": "uint16", "vocab_size": 65, "train": {"tokens": len(tokens)}}
    if recorded:
        meta["train"]["max_id"] = 65
    with pytest.raises(DataError, match=f"{tmp_path / 'train.bin'} holds token id 65, outside its vocabulary of 65"):
        open_tokens(tmp_path, "train", meta)
    assert len(open_tokens(tmp_path, "train", {**meta, "vocab_size": 66})) == len(tokens)


@pytest.mark.parametrize("size, message", [(7, "holds 7 bytes, not a whole number"), (0, "holds 0 bytes"),
                                           (8, "holds 4 tokens but meta.json says 5")])
def test_a_bin_file_that_does_not_match_its_metadata_is_refused(tmp_path, size, message):
    (tmp_path / "val.bin").write_bytes(b"\0" * size)
    with pytest.raises(DataError, match=message):
        open_tokens(tmp_path, "val", {"dtype": "uint16", "vocab_size": 65, "val": {"tokens": 5}})


def test_meta_pkl_from_nanogpt_is_read_but_never_runs_code(tmp_path):
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": {0: "\n", 1: "a", 2: "b"}}))
    meta = read_meta(tmp_path)
    assert meta["vocab_size"] == 3 and meta["tokenizer"] == {"name": "char", "chars": "\nab"}

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError, match="only plain data"):
        read_meta(tmp_path)


def test_missing_data_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run `gptrain prepare"):
        read_meta(tmp_path)
    with pytest.raises(DataError, match="train.bin not found"):
        open_tokens(tmp_path, "train", {"dtype": "uint16"})


def test_prepared_tokens_open_with_their_recorded_dtype(char_data):
    meta = read_meta(char_data)
    tokens = open_tokens(char_data, "train", meta)
    assert tokens.dtype == np.uint16 and int(tokens.max()) < meta["vocab_size"]


def test_nanogpt_gpt2_data_without_metadata_reads_as_gpt2(tmp_path, capsys):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    meta = read_meta(tmp_path)
    assert (meta["vocab_size"], meta["dtype"], meta["tokenizer"]) == (50257, "uint16", {"name": "gpt2"})
    assert "no meta.json" in capsys.readouterr().err


def test_a_token_file_that_disagrees_with_its_metadata_is_refused(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match="holds 100 tokens but meta.json says 200"):
        open_tokens(tmp_path, "train", {"dtype": "uint16", "train": {"tokens": 200}})
    with pytest.raises(DataError, match="holds 50 tokens"):  # uint16 data read as uint32
        open_tokens(tmp_path, "train", {"dtype": "uint32", "train": {"tokens": 100}})


def test_a_step_holds_the_same_sequences_whatever_the_micro_batch():
    tokens = np.random.default_rng(0).integers(0, 65, 10_000).astype(np.uint16)
    whole = BatchSampler(tokens, 16, 8, seed=3).batch(7, 0)[0]
    halves = [BatchSampler(tokens, 16, 4, seed=3).batch(7, i)[0] for i in (0, 1)]
    assert torch.equal(whole, torch.cat(halves))
