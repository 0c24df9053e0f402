import hashlib
import json
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptrain import prepare, sources
from gptrain.tokenizer import GPT2Tokenizer, from_meta

from test_sources import DOCS, NON_ASCII, SHAKESPEARE, write_corpus

SHAKESPEARE_PATH = Path(__file__).parents[1] / "data" / "tinyshakespeare.txt"
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
    monkeypatch.setattr(sources, "PIECE_BYTES", 10_000)
    run("--input", str(SHAKESPEARE_PATH), "--tokenizer", "gpt2", "--out_dir", str(tmp_path), num_proc=2)
    meta, train, val = load(tmp_path)
    n = int(len(SHAKESPEARE) * 0.9)
    assert meta["eot_id"] == 50256 and meta["tokenizer"] == {"name": "gpt2"}
    assert train.tolist() == GPT2.encode(SHAKESPEARE[:n]) + [50256]
    assert val.tolist() == GPT2.encode(SHAKESPEARE[n:]) + [50256]
    assert meta["train"]["text_bytes"] + meta["val"]["text_bytes"] == SHAKESPEARE_PATH.stat().st_size
    assert meta == pickle.loads((tmp_path / "meta.pkl").read_bytes())


# These run before any test that loads torch (streaming a dataset does), so that they fork.
OUTPUTS = ("train.bin", "val.bin", "meta.json", "meta.pkl")


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two output directories hold the same files with the same bytes."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()) == sorted(OUTPUTS)
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in OUTPUTS)


def interrupt(monkeypatch, *argv: str, recorded: int = 3, killed: int = 6) -> None:
    """Leave a run as a kill would: a progress record after `recorded` chunks, data written up to `killed`
    chunks, then a torn token and a torn record past that."""
    monkeypatch.setattr(prepare, "CHECKPOINT_SECONDS", 1e9)  # records only where this function says
    real_append = prepare.PartialOutput.append

    def append(self, stats, ids):
        real_append(self, stats, ids)
        if self.chunks == recorded:
            self.checkpoint()
        if self.chunks == killed:
            for f in self.files.values():
                f.flush()
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(prepare.PartialOutput, "append", append)
        with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C's status, as @command gives it
            run(*argv)
    out = Path(argv[argv.index("--out_dir") + 1])
    for name in ("train.bin.tmp", "val.bin.tmp"):
        with open(out / name, "ab") as f:
            f.write(b"\xff\xff\xff")  # above any id: max_id and the bytes show whether it was cut away
    (out / f".{prepare.PROGRESS}.k1ll3d.tmp").write_bytes(b'{"settin')  # as atomic_write names its temporary


def many_chunks(kind: str, root: Path, monkeypatch) -> Path:
    """A folder of DOCS or one non-ASCII text file, cut into 15 to 40 chunks."""
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 1_000)
    monkeypatch.setattr(sources, "PIECE_BYTES", 700)
    if kind == "txt_dir":
        return write_corpus(kind, root)
    (root / "input.txt").write_text(SHAKESPEARE[:20_000].replace("the ", "thé ") + "".join(DOCS[-1:]))
    return root / "input.txt"


@pytest.mark.parametrize("kind", ["txt_dir", "txt_file"])
def test_a_run_killed_past_its_progress_record_resumes_to_the_same_bytes(tmp_path, monkeypatch, capsys, kind):
    argv = ["--input", str(many_chunks(kind, tmp_path, monkeypatch)), "--out_dir"]
    run(*argv, str(tmp_path / "whole"))
    interrupt(monkeypatch, *argv, str(tmp_path / "out"))
    assert not any((tmp_path / "out" / name).exists() for name in OUTPUTS)  # unfinished, and looks it
    capsys.readouterr()
    run(*argv, str(tmp_path / "out"), num_proc=2)
    assert "resuming after 3 chunks" in capsys.readouterr().err
    assert same_bytes(tmp_path / "out", tmp_path / "whole")
    meta, train, val = load(tmp_path / "out")
    assert (meta["train"]["max_id"], meta["val"]["max_id"]) == (train.max(), val.max()) == (50256, 50256)


def killed_past_record(proc: subprocess.Popen, out: Path, chunks: int) -> bool:
    """SIGKILL `proc` if its progress record counts `chunks` or more and .bin.tmp bytes lie past the record."""
    assert proc.poll() is None, "the run ended before it could be killed"
    try:
        record = json.loads((out / prepare.PROGRESS).read_text())
    except FileNotFoundError:  # not written yet
        return False
    if record["chunks"] >= chunks and any(
        (out / f"{split}.bin.tmp").stat().st_size > 2 * record["stats"][split]["tokens"] for split in ("train", "val")
    ):
        proc.kill()
        return True
    return False


def test_a_run_killed_by_sigkill_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """Three real SIGKILLs, each while the .bin.tmp files hold bytes past the last progress record."""
    corpus, out = many_chunks("txt_dir", tmp_path, monkeypatch), tmp_path / "out"  # 40 chunks
    argv = ["--input", str(corpus), "--num_proc", "2", "--out_dir"]
    run(*argv, str(tmp_path / "whole"))
    child = """if True:
        import sys, time
        from gptrain import prepare, sources
        prepare.CHUNK_CHARS, sources.PIECE_BYTES, prepare.CHECKPOINT_SECONDS = 1_000, 700, 0.1
        append = prepare.PartialOutput.append
        def slow_append(self, stats, ids):  # about 0.03 s a chunk, so that a kill lands mid-run
            append(self, stats, ids)
            self.files["train"].flush()
            time.sleep(0.03)
        prepare.PartialOutput.append = slow_append
        prepare.main(sys.argv[1:])
    """
    resumed = []
    for kill_after in (2, 10, 20, None):
        with open(tmp_path / "stderr", "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-c", child, *argv, str(out)], stderr=stderr)
        try:
            while kill_after is not None and not killed_past_record(proc, out, kill_after):
                time.sleep(0.002)
            assert proc.wait(timeout=120) == (0 if kill_after is None else -signal.SIGKILL)
        finally:
            proc.kill()  # only if a failed assertion left it running
        resumed += re.findall(r"resuming after (\d+) chunks", (tmp_path / "stderr").read_text())
    assert len(resumed) == 3 and int(resumed[-1]) >= 20
    assert same_bytes(out, tmp_path / "whole")


@pytest.mark.parametrize("kind", ["txt_dir", "txt_file"])
def test_one_and_two_workers_write_the_same_bytes(tmp_path, monkeypatch, kind):
    corpus = many_chunks(kind, tmp_path, monkeypatch)
    for n in (1, 2):
        run("--input", str(corpus), "--out_dir", str(tmp_path / f"num_proc{n}"), num_proc=n)
    assert same_bytes(tmp_path / "num_proc1", tmp_path / "num_proc2")
    # Both hold the documents in corpus order, each encoded whole, though they spanned many chunks.
    source = prepare.open_corpus(prepare.build_parser().parse_args(["--input", str(corpus), "--out_dir", "-"]))
    assert len(list(prepare._chunks(prepare.split_documents(source, 0.1, 2357, None)))) >= 15
    expected = {"train": [], "val": []}
    for split, doc in prepare.split_documents(source, 0.1, 2357, None):
        expected[split] += GPT2.encode("".join(doc)) + [50256]
    _, train, val = load(tmp_path / "num_proc2")
    assert train.tobytes() == np.array(expected["train"], np.uint16).tobytes()
    assert val.tobytes() == np.array(expected["val"], np.uint16).tobytes()


@pytest.mark.parametrize(
    "change, why",
    [
        ("corpus", "its input_files differ"), ("tokenizer", "its tokenizer differ"),
        ("val_fraction", "its val_fraction differ"), ("lost_file", "val.bin.tmp missing or shorter than its record"),
    ],
)
def test_a_rerun_with_other_settings_starts_over(tmp_path, monkeypatch, capsys, change, why):
    corpus = many_chunks("txt_dir", tmp_path, monkeypatch)
    interrupt(monkeypatch, "--input", str(corpus), "--out_dir", str(tmp_path / "out"))
    argv = {"tokenizer": ["--tokenizer", "char"], "val_fraction": ["--val_fraction", "0.3"]}.get(change, [])
    if change == "corpus":
        (corpus / "doc005.txt").write_text("A changed document.\n")
    if change == "lost_file":
        (tmp_path / "out" / "val.bin.tmp").unlink()
    capsys.readouterr()
    run("--input", str(corpus), *argv, "--out_dir", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert f"discarding the partial run in {tmp_path / 'out'} ({why}); starting over\n" in err
    assert "resuming" not in err
    run("--input", str(corpus), *argv, "--out_dir", str(tmp_path / "fresh"))
    assert same_bytes(tmp_path / "out", tmp_path / "fresh")


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe", "char"])
@pytest.mark.parametrize("piece_bytes", [1, 5, 64])
def test_a_non_ascii_file_read_in_small_pieces_gives_the_ids_of_the_whole_text(
    tmp_path, monkeypatch, tokenizer, piece_bytes
):
    """A single file's first 90% of bytes (moved to a character boundary) is the train text, the rest val;
    reading it in pieces of a few bytes, splitting every multi-byte character, changes no id."""
    if tokenizer == "bpe":
        pytest.importorskip("tokenizers")
    monkeypatch.setattr(sources, "PIECE_BYTES", piece_bytes)
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 500)
    data = NON_ASCII.encode()
    (tmp_path / "input.txt").write_bytes(data)
    run("--input", str(tmp_path / "input.txt"), "--tokenizer", tokenizer, "--vocab_size", "300",
        "--out_dir", str(tmp_path / "out"), num_proc=2)
    meta, train, val = load(tmp_path / "out")
    cut = meta["train"]["text_bytes"]
    assert int(len(data) * 0.9) <= cut < int(len(data) * 0.9) + 4 and cut + meta["val"]["text_bytes"] == len(data)
    whole = from_meta(meta["tokenizer"])
    eot = [] if whole.eot_id is None else [whole.eot_id]
    assert train.tobytes() == np.array(whole.encode(data[:cut].decode()) + eot, meta["dtype"]).tobytes()
    assert val.tobytes() == np.array(whole.encode(data[cut:].decode()) + eot, meta["dtype"]).tobytes()


def test_a_run_killed_while_writing_its_metadata_is_rebuilt(tmp_path):
    args = ["--input", str(SHAKESPEARE_PATH), "--tokenizer", "char"]
    run(*args, "--out_dir", str(tmp_path / "whole"))
    run(*args, "--out_dir", str(tmp_path / "out"))
    (tmp_path / "out" / "meta.json").unlink()  # killed after meta.pkl, before meta.json and the record's removal
    (tmp_path / "out" / prepare.PROGRESS).write_text('{"settings": {}, "chunks": 1, "stats": {}}')
    run(*args, "--out_dir", str(tmp_path / "out"))
    assert same_bytes(tmp_path / "out", tmp_path / "whole")


def test_each_output_is_on_disk_before_the_next_is_named(tmp_path, monkeypatch):
    """The token files' renames, then the metadata's, each followed by an fsync of the directory, so that
    after a power cut a meta.json never describes .bin files that are not there."""
    out, events, replace, fsync = tmp_path / "out", [], os.replace, os.fsync

    def record_replace(src, dst) -> None:
        replace(src, dst)
        events.append(Path(dst).name)

    def record_fsync(fd: int) -> None:
        fsync(fd)
        if os.path.samestat(os.fstat(fd), os.stat(out)):
            events.append("sync")

    monkeypatch.setattr(os, "replace", record_replace)
    monkeypatch.setattr(os, "fsync", record_fsync)
    run("--input", str(SHAKESPEARE_PATH), "--tokenizer", "char", "--out_dir", str(out))
    named = [e for e in events if e != prepare.PROGRESS]  # the record, written every few seconds, comes and goes
    while "sync" in named[:1]:
        named.pop(0)
    assert named == ["train.bin", "sync", "val.bin", "sync", "meta.pkl", "sync", "meta.json", "sync"]


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
    pytest.importorskip("datasets")
    write_corpus("jsonl", tmp_path)
    out = tmp_path / "out"
    run("--dataset", str(tmp_path), "--streaming", "--max_docs", "10", "--out_dir", str(out))
    meta, train, val = load(out)
    assert meta["train"]["documents"] + meta["val"]["documents"] == 10
    assert sorted(documents_in(train, 50256) + documents_in(val, 50256)) == sorted(GPT2.encode(d) for d in DOCS[:10])


def test_openwebtext_shim_passes_its_defaults_and_extra_flags(tmp_path):
    pytest.importorskip("datasets")
    write_corpus("jsonl", tmp_path)  # stands in for the hub dataset: --dataset given later wins
    shim = Path(__file__).parents[1] / "data" / "openwebtext" / "preprocess.py"
    out = tmp_path / "owt"
    extra = ["--tokenizer", "gpt2", "--dataset", str(tmp_path), "--streaming", "--out_dir", str(out), "--num_proc", "1"]
    subprocess.run([sys.executable, str(shim), *extra], check=True, capture_output=True)
    meta = load(out)[0]
    assert (meta["val_fraction"], meta["seed"], meta["eot_id"]) == (0.0005, 2357, 50256)
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(DOCS)


def test_bpe_is_trained_saved_and_decodes_the_data(tmp_path):
    pytest.importorskip("tokenizers")
    run("--input", str(write_corpus("jsonl", tmp_path)), "--tokenizer", "bpe", "--vocab_size", "400",
        "--out_dir", str(tmp_path / "out"))
    meta, train, val = load(tmp_path / "out")
    assert meta["vocab_size"] == 400 and meta["tokenizer"]["name"] == "bpe"
    bpe = from_meta(json.loads(json.dumps(meta["tokenizer"])))
    texts = bpe.decode(np.concatenate([train, val]).tolist()).split("<|endoftext|>")[:-1]
    assert sorted(texts) == sorted(DOCS)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == meta["tokenizer"]["tokenizer_json"]


def test_large_vocabulary_uses_uint32_and_refuses_uint16(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

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
    assert meta["train"]["max_id"] == meta["val"]["max_id"] == 70_001  # for training's cheap check on vocab_size


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
    rebuilt = (tmp_path / "train.bin").read_bytes()
    (tmp_path / "train.bin").unlink()  # metadata without its data is not finished: rebuilt, not kept
    run(*args)
    assert (tmp_path / "train.bin").read_bytes() == rebuilt


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        (None, ["--input", "{tmp}/nope.txt"], "does not exist"),  # a source's error on opening
        ({"blank.jsonl": b"\n"}, ["--input", "{tmp}/blank.jsonl"], "holds no text"),
        ({"bad.txt": b"caf\xe9 au lait\n"}, ["--input", "{tmp}/bad.txt"], "not UTF-8 text (byte 0xe9 at offset 3)"),
        ({"a.jsonl": b'{"body": "x"}\n'}, ["--input", "{tmp}/a.jsonl"], "no 'text' field"),  # ...while tokenizing
        ({"a.txt": b"hello\n"}, ["--input", "{tmp}/a.txt", "--tokenizer", "gpt5"], "unknown tokenizer 'gpt5'"),
        ({"a.txt": b"hello\n"}, ["--input", "{tmp}/a.txt", "--val_fraction", "1.5"], "--val_fraction must be"),
        (
            {"a.txt": b"hello\n"}, ["--input", "{tmp}/a.txt", "--val_fraction", "0", "--max_docs", "0"],
            "--val_fraction must be between 0 and 1, got 0.0; --max_docs must be at least 1, got 0",
        ),
        (
            {"a.txt": b"hello\n"}, ["--input", "{tmp}/a.txt", "--tokenizer", "bpe", "--vocab_size", "100"],
            "--vocab_size must be at least 257 for a byte-level BPE, got 100",
        ),
        ({"a.txt": b"hello\n", "out": b""}, ["--input", "{tmp}/a.txt"], "out is a file, not a directory"),
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
    assert not (tmp_path / "out").is_dir()  # not made, or removed with its partial output


def test_a_failed_overwrite_keeps_the_finished_dataset(tmp_path, capsys):
    run("--input", str(SHAKESPEARE_PATH), "--tokenizer", "char", "--out_dir", str(tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(SystemExit):
        run("--input", str(tmp_path / "nope.txt"), "--overwrite", "--out_dir", str(tmp_path / "out"))
    assert "does not exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="this platform cannot fork")
def test_spawn_writes_what_fork_writes(tmp_path, monkeypatch):
    import torch  # here, and last in the file: once torch is loaded, every later run spawns

    torch.ones(512, 512) @ torch.ones(512, 512)  # torch's threads now run, as in a training script
    assert prepare.default_start_method() == "spawn"
    monkeypatch.setattr(sources, "PIECE_BYTES", 10_000)  # several chunks on two workers: their order counts
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 20_000)
    corpus = tmp_path / "input.txt"
    corpus.write_text(SHAKESPEARE[:100_000])
    run("--input", str(corpus), "--out_dir", str(tmp_path / "spawn"), num_proc=2)
    run("--input", str(corpus), "--out_dir", str(tmp_path / "fork"), "--start_method", "fork", num_proc=2)
    for name in ("train.bin", "val.bin", "meta.json", "meta.pkl"):
        assert (tmp_path / "spawn" / name).read_bytes() == (tmp_path / "fork" / name).read_bytes()
