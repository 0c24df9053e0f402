import hashlib
import json
import multiprocessing
import pickle
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from gptrain import prepare
from gptrain.tokenizer import GPT2Tokenizer, from_meta

SHAKESPEARE_PATH = Path(__file__).parents[1] / "data" / "tinyshakespeare.txt"
SHAKESPEARE = SHAKESPEARE_PATH.read_text()
# 40 documents of different lengths, one with non-ASCII text so that bytes and characters differ.
DOCS = [SHAKESPEARE[i * 997 : i * 997 + 300 + 37 * i] for i in range(39)] + ["Café naïve 🙂 — fin.\n"]
GPT2 = GPT2Tokenizer()


def run(*argv: str, num_proc: int = 1) -> None:
    prepare.main([*argv, "--num_proc", str(num_proc)])


def load(out_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    meta = json.loads((out_dir / "meta.json").read_text())
    return meta, *(np.fromfile(out_dir / f"{split}.bin", dtype=meta["dtype"]) for split in ("train", "val"))


def documents_in(ids: np.ndarray, eot: int) -> list[list[int]]:
    """Split a token stream back into documents at its end-of-text tokens (each must end with one)."""
    assert ids[-1] == eot
    ends = np.flatnonzero(ids == eot)
    return [ids[start + 1 : end].tolist() for start, end in zip([-1, *ends[:-1]], ends)]


def write_corpus(kind: str, root: Path) -> Path:
    """DOCS in one of the formats `gptrain prepare --input` reads."""
    if kind == "datasets":
        datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))}).save_to_disk(str(root / "ds"))
        return root / "ds"
    if kind == "jsonl":
        path = root / "docs.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCS)))
        return path
    if kind == "parquet":
        pq.write_table(pa.table({"text": DOCS}), root / "docs.parquet")
        return root / "docs.parquet"
    (root / "txt").mkdir()
    for i, doc in enumerate(DOCS):
        (root / "txt" / f"doc{i:03d}.txt").write_text(doc)
    return root / "txt"


def test_char_on_shakespeare_keeps_nanogpt_layout(tmp_path):
    run("--input", str(SHAKESPEARE_PATH), "--tokenizer", "char", "--out_dir", str(tmp_path))
    meta, train, val = load(tmp_path)
    n = int(len(SHAKESPEARE) * 0.9)  # first 90% train, last 10% val
    assert (meta["vocab_size"], meta["dtype"], meta["eot_id"]) == (65, "uint16", None)
    assert (meta["train"]["tokens"], meta["val"]["tokens"]) == (n, len(SHAKESPEARE) - n)
    assert meta["train"]["documents"] == meta["val"]["documents"] == 1
    assert meta["train"]["sha256"] == hashlib.sha256((tmp_path / "train.bin").read_bytes()).hexdigest()
    char = from_meta(meta["tokenizer"])
    assert char.decode(train.tolist()) == SHAKESPEARE[:n] and char.decode(val.tolist()) == SHAKESPEARE[n:]
    pickled = pickle.loads((tmp_path / "meta.pkl").read_bytes())
    assert pickled["vocab_size"] == 65 and pickled["itos"][pickled["stoi"]["A"]] == "A"


def test_gpt2_on_shakespeare_counts_tokens_bytes_and_eot(tmp_path, monkeypatch):
    # Read the file in ~10 KB pieces: the ids must still be those of the whole text.
    monkeypatch.setattr(prepare, "PIECE_BYTES", 10_000)
    run("--input", str(SHAKESPEARE_PATH), "--tokenizer", "gpt2", "--out_dir", str(tmp_path), num_proc=2)
    meta, train, val = load(tmp_path)
    n = int(len(SHAKESPEARE) * 0.9)
    assert meta["eot_id"] == 50256 and meta["tokenizer"] == {"name": "gpt2"}
    assert train.tolist() == GPT2.encode(SHAKESPEARE[:n]) + [50256]
    assert val.tolist() == GPT2.encode(SHAKESPEARE[n:]) + [50256]
    assert meta["train"]["text_bytes"] + meta["val"]["text_bytes"] == SHAKESPEARE_PATH.stat().st_size
    assert meta == pickle.loads((tmp_path / "meta.pkl").read_bytes())


@pytest.mark.parametrize("kind", ["datasets", "jsonl", "parquet", "txt_dir"])
def test_every_source_format_gives_the_documents_plus_one_eot_each(tmp_path, kind):
    out = tmp_path / "out"
    run("--input", str(write_corpus(kind, tmp_path)), "--out_dir", str(out), "--val_fraction", "0.2")
    meta, train, val = load(out)
    train_docs, val_docs = documents_in(train, 50256), documents_in(val, 50256)
    assert sorted(train_docs + val_docs) == sorted(GPT2.encode(d) for d in DOCS)
    assert len(train) + len(val) == sum(len(GPT2.encode(d)) + 1 for d in DOCS)
    assert (meta["train"]["documents"], meta["val"]["documents"]) == (len(train_docs), len(val_docs))
    assert 1 <= len(val_docs) < len(DOCS) // 2
    assert meta["train"]["text_bytes"] + meta["val"]["text_bytes"] == sum(len(d.encode()) for d in DOCS)
    # The seeded split depends only on the documents' order, not on the format they came in.
    assert val_docs[0] == GPT2.encode(DOCS[0]) and train_docs[0] == GPT2.encode(DOCS[1])


def test_streaming_a_dataset_with_max_docs(tmp_path):
    write_corpus("jsonl", tmp_path)
    out = tmp_path / "out"
    run("--dataset", str(tmp_path), "--streaming", "--max_docs", "10", "--out_dir", str(out))
    meta, train, val = load(out)
    assert meta["train"]["documents"] + meta["val"]["documents"] == 10
    assert sorted(documents_in(train, 50256) + documents_in(val, 50256)) == sorted(GPT2.encode(d) for d in DOCS[:10])


def test_openwebtext_shim_passes_its_defaults_and_extra_flags(tmp_path):
    write_corpus("jsonl", tmp_path)  # stands in for the hub dataset: --dataset given later wins
    shim = Path(__file__).parents[1] / "data" / "openwebtext" / "preprocess.py"
    out = tmp_path / "owt"
    extra = ["--tokenizer", "gpt2", "--dataset", str(tmp_path), "--streaming", "--out_dir", str(out), "--num_proc", "1"]
    subprocess.run([sys.executable, str(shim), *extra], check=True, capture_output=True)
    meta = load(out)[0]
    assert (meta["val_fraction"], meta["seed"], meta["eot_id"]) == (0.0005, 2357, 50256)
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(DOCS)


def test_bpe_is_trained_saved_and_decodes_the_data(tmp_path):
    run("--input", str(write_corpus("jsonl", tmp_path)), "--tokenizer", "bpe", "--vocab_size", "400",
        "--out_dir", str(tmp_path / "out"))
    meta, train, val = load(tmp_path / "out")
    assert meta["vocab_size"] == 400 and meta["tokenizer"]["name"] == "bpe"
    bpe = from_meta(json.loads(json.dumps(meta["tokenizer"])))
    texts = bpe.decode(np.concatenate([train, val]).tolist()).split("<|endoftext|>")[:-1]
    assert sorted(texts) == sorted(DOCS)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == meta["tokenizer"]["tokenizer_json"]


def test_large_vocabulary_uses_uint32_and_refuses_uint16(tmp_path, capsys):
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "</s>": 70_001}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    hf.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "docs.txt").write_text("w1 w69999 w5\n" * 50)
    args = ["--input", str(tmp_path / "docs.txt"), "--tokenizer", f"hf:{tmp_path / 'tok'}"]
    with pytest.raises(SystemExit) as exit:
        run(*args, "--dtype", "uint16", "--out_dir", str(tmp_path / "small"))
    assert exit.value.code == 2 and "does not fit --dtype uint16" in capsys.readouterr().err
    run(*args, "--out_dir", str(tmp_path / "big"))
    meta, train, _ = load(tmp_path / "big")
    assert meta["dtype"] == "uint32" and meta["eot_id"] == 70_001 and train[1] == 69_999


def test_interrupted_run_looks_unfinished_then_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 2_000)  # many chunks out of a small corpus
    monkeypatch.setattr(prepare, "CHECKPOINT_SECONDS", 0)  # record progress after every chunk
    corpus, out = write_corpus("jsonl", tmp_path), tmp_path / "out"
    real_chunks = prepare._chunks

    def killed_after_four_chunks(docs):
        for i, chunk in enumerate(real_chunks(docs)):
            if i == 4:
                raise KeyboardInterrupt
            yield chunk

    with monkeypatch.context() as m:
        m.setattr(prepare, "_chunks", killed_after_four_chunks)
        with pytest.raises(KeyboardInterrupt):
            run("--input", str(corpus), "--out_dir", str(out))
    assert (out / "train.bin.tmp").exists()
    assert not any((out / name).exists() for name in ("train.bin", "val.bin", "meta.json", "meta.pkl"))
    run("--input", str(corpus), "--out_dir", str(out))
    assert re.search(r"resuming after [1-4] chunks", capsys.readouterr().err)
    meta, train, val = load(out)
    assert sorted(documents_in(train, 50256) + documents_in(val, 50256)) == sorted(GPT2.encode(d) for d in DOCS)
    assert meta["train"]["sha256"] == hashlib.sha256((out / "train.bin").read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "meta.pkl", "train.bin", "val.bin"]


def test_changed_settings_discard_a_partial_run(tmp_path, capsys):
    (tmp_path / "train.bin.tmp").write_bytes(b"stale")
    (tmp_path / prepare.PROGRESS).write_text(json.dumps({"fingerprint": "other", "chunks": 9, "stats": {}}))
    run("--input", str(SHAKESPEARE_PATH), "--tokenizer", "char", "--out_dir", str(tmp_path))
    assert "discarding the partial run" in capsys.readouterr().err
    assert load(tmp_path)[0]["train"]["tokens"] == int(len(SHAKESPEARE) * 0.9)


def test_finished_output_is_kept_unless_overwrite(tmp_path, capsys):
    args = ["--input", str(SHAKESPEARE_PATH), "--tokenizer", "char", "--out_dir", str(tmp_path)]
    run(*args)
    (tmp_path / "train.bin").write_bytes(b"")  # a marker: would a second run touch it?
    run(*args)
    assert "already holds a finished dataset" in capsys.readouterr().out
    assert (tmp_path / "train.bin").stat().st_size == 0
    run(*args, "--overwrite")
    assert load(tmp_path)[1].size == int(len(SHAKESPEARE) * 0.9)


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        (None, ["--input", "{tmp}/nope.txt"], "does not exist"),
        ({"empty/": None}, ["--input", "{tmp}/empty"], "holds no .txt"),
        ({"blank.jsonl": b"\n"}, ["--input", "{tmp}/blank.jsonl"], "holds no text"),
        ({"bad.txt": b"caf\xe9 au lait\n"}, ["--input", "{tmp}/bad.txt"], "invalid UTF-8"),
        ({"bad.jsonl": b'{"text": "caf\xe9"}\n'}, ["--input", "{tmp}/bad.jsonl"], "bad.jsonl:1: not valid UTF-8"),
        ({"a.jsonl": b'{"body": "x"}\n'}, ["--input", "{tmp}/a.jsonl"], "no 'text' field"),
        ({"a.txt": b"hello\n"}, ["--input", "{tmp}/a.txt", "--tokenizer", "gpt5"], "unknown tokenizer 'gpt5'"),
        ({"a.txt": b"hello\n"}, ["--input", "{tmp}/a.txt", "--val_fraction", "1.5"], "--val_fraction must be"),
    ],
)
def test_bad_input_stops_with_one_line(tmp_path, capsys, setup, argv, message):
    for name, content in (setup or {}).items():
        (tmp_path / name).mkdir() if content is None else (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as exit:
        run(*[a.format(tmp=tmp_path) for a in argv], "--out_dir", str(tmp_path / "out"))
    err = capsys.readouterr().err  # may hold a progress bar before the error
    assert exit.value.code == 2 and "Traceback" not in err
    assert err.endswith("\n") and err.rstrip("\n").split("\n")[-1].startswith("error: ") and message in err
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="this platform cannot fork")
def test_spawn_writes_what_fork_writes(tmp_path, monkeypatch):
    import torch  # here, and last in the file: once torch is loaded, every later run spawns

    torch.ones(512, 512) @ torch.ones(512, 512)  # torch's threads now run, as in a training script
    assert prepare.default_start_method() == "spawn"
    monkeypatch.setattr(prepare, "PIECE_BYTES", 10_000)  # several chunks on two workers: their order counts
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 20_000)
    corpus = tmp_path / "input.txt"
    corpus.write_text(SHAKESPEARE[:100_000])
    run("--input", str(corpus), "--out_dir", str(tmp_path / "spawn"), num_proc=2)
    run("--input", str(corpus), "--out_dir", str(tmp_path / "fork"), "--start_method", "fork", num_proc=2)
    for name in ("train.bin", "val.bin", "meta.json", "meta.pkl"):
        assert (tmp_path / "spawn" / name).read_bytes() == (tmp_path / "fork" / name).read_bytes()
