"""The sources `gptrain prepare` reads: every format opens as the same documents, in order; a large text file
is read in pieces cut only where a tokenizer splits anyway; a bad input is one line naming where it is."""

import json
import os
from pathlib import Path

import pytest

from gptrain import sources
from gptrain.sources import CorpusError, head_and_tail, open_hub, open_local, text_pieces

SHAKESPEARE = (Path(__file__).parents[1] / "data" / "tinyshakespeare.txt").read_text()
# 40 documents of different lengths, one with non-ASCII text so that bytes and characters differ.
DOCS = [SHAKESPEARE[i * 997 : i * 997 + 300 + 37 * i] for i in range(39)] + ["Café naïve 🙂 — fin.\n"]
# Lines a pre-tokenizer treats differently: multi-byte characters, spaces at either end, CR, a long word.
NON_ASCII = "\n\n  " + "".join(
    f"{line}\n" for line in [
        "Café naïve 🙂 — fin.", "Ελληνικά: αβγ δεζ", "日本語のテキストです。", "  indented, then blank:", "",
        "e\u0301 combining, 👩‍👩‍👧 joined", "trailing space ", "windows\r", "'s 're contractions", "x" * 300,
    ] * 12
)


def write_corpus(kind: str, root: Path) -> Path:
    """DOCS in one of the formats `gptrain prepare --input` reads."""
    if kind == "datasets":
        datasets = pytest.importorskip("datasets")  # gptrain[data], as are pyarrow and tokenizers
        datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))}).save_to_disk(str(root / "ds"))
        return root / "ds"
    if kind == "jsonl":
        path = root / "docs.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCS)))
        return path
    if kind == "parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"text": DOCS}), root / "docs.parquet")
        return root / "docs.parquet"
    (root / "txt").mkdir()
    for i, doc in enumerate(DOCS):
        (root / "txt" / f"doc{i:03d}.txt").write_text(doc)
    return root / "txt"


def texts(corpus: sources.Corpus) -> list[str]:
    return ["".join(document) for document in corpus.documents()]


@pytest.mark.parametrize("kind", ["datasets", "jsonl", "parquet", "txt_dir", "hub", "hub_streaming"])
def test_every_format_opens_as_its_documents_in_order(tmp_path, kind):
    if kind.startswith("hub"):  # load_dataset reads a local folder of JSON lines as it reads the hub's
        pytest.importorskip("datasets")  # gptrain[data]
        write_corpus("jsonl", tmp_path)
        corpus = open_hub(str(tmp_path), config=None, split="train", text_column="text",
                          streaming=kind == "hub_streaming", cache_dir=str(tmp_path / "cache"), num_proc=1)
    else:
        corpus = open_local(write_corpus(kind, tmp_path), split="train", text_column="text")
    assert texts(corpus) == DOCS
    assert texts(corpus) == DOCS  # each call is a fresh pass
    assert corpus.single_file is None and corpus.num_docs in (None, len(DOCS))


@pytest.mark.parametrize("piece_bytes", [1, 5, 64])
def test_text_pieces_join_to_the_file_and_cut_only_between_non_spaces(tmp_path, monkeypatch, piece_bytes):
    """Pieces of a few bytes split every multi-byte character on reading; the pieces given out hold whole
    characters and end at a newline between two non-space characters, where GPT-2's pre-tokenizer splits."""
    monkeypatch.setattr(sources, "PIECE_BYTES", piece_bytes)
    (tmp_path / "input.txt").write_text(NON_ASCII)
    pieces = list(text_pieces(tmp_path / "input.txt"))
    assert "".join(pieces) == NON_ASCII and len(pieces) > 20
    for piece, following in zip(pieces, pieces[1:]):
        assert piece.endswith("\n") and not piece[-2].isspace() and not following[0].isspace()


def test_head_and_tail_cut_a_file_between_characters(tmp_path):
    data = NON_ASCII.encode()
    (tmp_path / "input.txt").write_bytes(data)
    for fraction in [i / 400 for i in range(401)]:  # many of them fall inside a multi-byte character
        head, tail = ("".join(document) for document in head_and_tail(tmp_path / "input.txt", fraction))
        assert head + tail == NON_ASCII
        assert int(len(data) * fraction) <= len(head.encode()) < int(len(data) * fraction) + 4


def test_one_text_file_is_held_out_by_its_tail_and_versions_follow_the_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    corpus = open_local(tmp_path / "a.txt", split="train", text_column="text")
    assert corpus.single_file == tmp_path / "a.txt" and corpus.text_bytes == 6
    again = open_local(tmp_path / "a.txt", split="train", text_column="text")
    (tmp_path / "a.txt").write_text("hello, world\n")
    changed = open_local(tmp_path / "a.txt", split="train", text_column="text")
    assert corpus.version == again.version != changed.version


@pytest.mark.parametrize("piece_bytes", [1, 4, 1 << 20])
def test_a_non_utf8_byte_is_named_with_its_offset_in_any_piece(tmp_path, monkeypatch, piece_bytes):
    monkeypatch.setattr(sources, "PIECE_BYTES", piece_bytes)
    (tmp_path / "bad.txt").write_bytes(b"abc\n" * 10 + "dé".encode() + b"\xc3x\n" + b"more text\n" * 10)
    corpus = open_local(tmp_path / "bad.txt", split="train", text_column="text")
    with pytest.raises(CorpusError) as e:
        texts(corpus)
    assert str(e.value) == f"{tmp_path / 'bad.txt'}: not UTF-8 text (byte 0xc3 at offset 43)"


@pytest.mark.parametrize("files, given, message", [
    ({}, "nope.txt", "--input {tmp}/nope.txt does not exist"),
    ({"empty/": None}, "empty", "{tmp}/empty holds no .txt, .jsonl, .parquet files"),
    ({"a.csv": b"x\n"}, "a.csv", "--input {tmp}/a.csv: expected a .txt, .jsonl, .parquet file or a directory"),
    ({"bad.jsonl": b'{"text": "caf\xe9"}\n'}, "bad.jsonl", "{tmp}/bad.jsonl:1: not valid UTF-8 JSON"),
    ({"a.jsonl": b'{"body": "x"}\n'}, "a.jsonl", "{tmp}/a.jsonl:1: no 'text' field (set --text_column)"),
    ({"a.jsonl": b'{"text": 3}\n'}, "a.jsonl", "{tmp}/a.jsonl:1: expected text, found int"),
    ({"ds/": "datasets"}, "ds", "{tmp}/ds has no 'body' column (has ['text', 'id']; set --text_column)"),
])
def test_a_bad_input_is_one_line_naming_it(tmp_path, files, given, message):
    for name, content in files.items():
        if content == "datasets":
            write_corpus("datasets", tmp_path)
        elif content is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(content)
    column = "body" if given == "ds" else "text"
    with pytest.raises(CorpusError) as e:
        texts(open_local(tmp_path / given, split="train", text_column=column))
    assert str(e.value).startswith(message.format(tmp=tmp_path)) and "\n" not in str(e.value)


def test_a_saved_dataset_dict_opens_the_split_asked_for(tmp_path):
    datasets = pytest.importorskip("datasets")
    both = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:3]}),
                                 "test": datasets.Dataset.from_dict({"text": DOCS[3:5]})})
    both.save_to_disk(str(tmp_path / "dd"))
    assert texts(open_local(tmp_path / "dd", split="test", text_column="text")) == DOCS[3:5]
    with pytest.raises(CorpusError, match=r"has no split 'val' \(has \['train', 'test'\]; set --split\)"):
        open_local(tmp_path / "dd", split="val", text_column="text")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_found_on_opening_before_any_is_read(tmp_path):
    corpus = write_corpus("txt_dir", tmp_path)
    (corpus / "doc007.txt").chmod(0)
    with pytest.raises(CorpusError) as e:
        open_local(corpus, split="train", text_column="text")
    assert str(e.value) == f"cannot read {corpus / 'doc007.txt'}: permission denied"
