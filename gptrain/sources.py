"""Where `gptrain prepare` reads text from: a corpus opened as a lazy stream of documents.

Five kinds of source, one shape: local .txt files (a whole file is a document, read in pieces), JSON lines
and Parquet files (a document per line or row), a folder that `datasets` saved, and a dataset on the
Hugging Face hub. Opening a corpus checks what can be checked up front (paths, permissions, columns, the
packages a format needs), so that a bad input fails before hours of tokenizing; the documents themselves
are read only when iterated, so no corpus is ever held in memory whole. Each corpus carries a version of
its local files, which prepare's resume compares. Messages name prepare's flags: it is the only caller.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptrain.errors import UserError, not_utf8
from gptrain.extras import require

PIECE_BYTES = 1 << 20  # a large text file is read and tokenized in pieces of about this size
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")

# A document is an iterable of text pieces (one string, or a large file read piece by piece).
Document = Iterable[str]


class CorpusError(UserError):
    """A corpus that cannot be read as documents: missing, unreadable, not UTF-8, without its text field."""


@dataclass
class Corpus:
    description: str  # recorded in metadata and used in messages
    documents: Callable[[], Iterator[Document]]  # a fresh pass over the corpus each call
    single_file: Path | None = None  # one text file: hold out its tail rather than whole documents
    num_docs: int | None = None  # for the progress bar, when the source knows it
    text_bytes: int | None = None  # rough size of the text, for the disk-space check
    version: str = ""  # changes when local files change, so a stale partial run is not resumed


def _files_version(paths: Iterable[Path]) -> str:
    return json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths])


# ---------------------------------------------------------------------------------------------
# Text files, read in pieces that tokenize as the whole file would.


def text_pieces(path: Path, start: int = 0, end: int | None = None) -> Iterator[str]:
    """Yield bytes [start, end) of a UTF-8 file as text pieces of about PIECE_BYTES.

    Pieces are cut after a newline with non-space on both sides: there GPT-2-style pre-tokenizers
    split anyway, so tokenizing piece by piece gives the same ids as tokenizing the whole file. A file
    with no such newline (CRLF line ends, one long line) is read whole into one piece.
    """
    end = path.stat().st_size if end is None else end
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        while offset < end:
            block = f.read(min(PIECE_BYTES, end - offset))
            offset += len(block)
            try:
                text = carry + decoder.decode(block, final=offset >= end)
            except UnicodeDecodeError as e:  # e.object is the decoder's held-back bytes plus this block
                raise CorpusError(not_utf8(str(path), e, offset - len(e.object) + e.start)) from None
            cut = len(text) if offset >= end else _safe_cut(text, len(carry) - 1)
            if cut:
                yield text[:cut]
            carry = text[cut:]


def _safe_cut(text: str, start: int) -> int:
    """Index just after the last newline from `start` on flanked by non-space characters, or 0 if none.

    The caller has found the newlines before `start` unsafe already; looking at them again would rescan
    a text with no safe cut at all (CRLF line ends, one long line) in full for every piece read.
    """
    start = max(start, 1)  # a newline at 0 has no known character before it
    i = text.rfind("\n", start, len(text) - 1)  # nor has one at the end a known character after it
    while i > 0 and (text[i - 1].isspace() or text[i + 1].isspace()):
        i = text.rfind("\n", start, i)
    return i + 1 if i > 0 else 0


def head_and_tail(path: Path, fraction: float) -> tuple[Document, Document]:
    """A text file as two documents: its first `fraction` of bytes, the cut moved forward off UTF-8
    continuation bytes so that no character is split, and the rest."""
    size = path.stat().st_size
    cut = int(size * fraction)
    with open(path, "rb") as f:
        f.seek(cut)
        cut += len(list(itertools.takewhile(lambda b: b & 0xC0 == 0x80, f.read(4))))
    return text_pieces(path, 0, cut), text_pieces(path, cut, size)


# ---------------------------------------------------------------------------------------------
# Records: JSON lines, Parquet rows and `datasets` rows, a document each.


def _check_text(text, where: str) -> str:
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            raise CorpusError(f"{where}: invalid UTF-8 text") from None
    if not isinstance(text, str):
        raise CorpusError(f"{where}: expected text, found {type(text).__name__}")
    return text


def _jsonl_documents(path: Path, column: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[column]
            except ValueError as e:  # also UnicodeDecodeError
                raise CorpusError(f"{path}:{lineno}: not valid UTF-8 JSON ({e})") from None
            except (KeyError, TypeError):
                raise CorpusError(f"{path}:{lineno}: no {column!r} field (set --text_column)") from None
            yield (_check_text(text, f"{path}:{lineno}"),)


def _parquet_documents(path: Path, column: str) -> Iterator[Document]:
    import pyarrow.parquet as pq  # open_local has checked that it is installed

    table = pq.ParquetFile(path)
    if column not in table.schema_arrow.names:
        raise CorpusError(f"{path}: no {column!r} column (has {table.schema_arrow.names}; set --text_column)")
    for batch in table.iter_batches(columns=[column], batch_size=1024):
        try:
            texts = batch.column(0).to_pylist()
        except UnicodeDecodeError:
            raise CorpusError(f"{path}: invalid UTF-8 in column {column!r}") from None
        for text in texts:
            yield (_check_text(text, str(path)),)


def _file_documents(paths: list[Path], column: str) -> Iterator[Document]:
    """Documents of local files: a whole .txt file each, or one per JSON line / Parquet row."""
    for path in paths:
        if path.suffix == ".txt":
            if path.stat().st_size:
                yield text_pieces(path)
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, column)
        else:
            yield from _parquet_documents(path, column)


def _dataset_documents(ds, column: str) -> Iterator[Document]:
    for batch in ds.select_columns([column]).iter(batch_size=1024):
        for text in batch[column]:
            yield (_check_text(text, "dataset"),)


def _dataset_corpus(ds, description: str, column: str, version: str = "") -> Corpus:
    if ds.column_names is not None and column not in ds.column_names:
        raise CorpusError(f"{description} has no {column!r} column (has {ds.column_names}; set --text_column)")
    num_docs = len(ds) if hasattr(ds, "__len__") else None
    size = ds.data.nbytes if hasattr(ds, "data") else ds.info.dataset_size
    documents = lambda: _dataset_documents(ds, column)  # noqa: E731
    return Corpus(description, documents, num_docs=num_docs, text_bytes=size, version=version)


# ---------------------------------------------------------------------------------------------
# Opening a corpus: a hub dataset by name, or a local path.


def open_hub(name: str, *, config: str | None, split: str, text_column: str, streaming: bool,
             cache_dir: str | None, num_proc: int) -> Corpus:
    """A dataset of the Hugging Face hub (or a folder `datasets.load_dataset` reads), downloaded first or streamed."""
    datasets = require("datasets", "data", "--dataset", error=CorpusError)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming, cache_dir=cache_dir,
                                   num_proc=None if streaming else num_proc)
    except Exception as e:  # the hub raises many types; the user needs the name and the reason
        raise CorpusError(f"cannot load dataset {name!r}: {str(e).splitlines()[0]}") from None
    return _dataset_corpus(ds, name, text_column)


def open_local(path: str | Path, *, split: str, text_column: str) -> Corpus:
    """A .txt, .jsonl or .parquet file, a folder of them, or a folder that `datasets` saved (its `split`, if it
    saved several); every file is checked for readability now, not after the files before it are tokenized."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"--input {path} does not exist")
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        datasets = require("datasets", "data", f"--input {path} (a saved dataset)", error=CorpusError)
        ds = datasets.load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict saved whole
            if split not in ds:
                raise CorpusError(f"{path} has no split {split!r} (has {list(ds)}; set --split)")
            ds = ds[split]
        return _dataset_corpus(ds, str(path), text_column, _files_version(sorted(path.rglob("*.arrow"))))

    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not paths:
            raise CorpusError(f"{path} holds no {', '.join(TEXT_SUFFIXES)} files")
    elif path.suffix in TEXT_SUFFIXES:
        paths = [path]
    else:
        raise CorpusError(f"--input {path}: expected a {', '.join(TEXT_SUFFIXES)} file or a directory")
    unreadable = [p for p in paths if not os.access(p, os.R_OK)]
    if unreadable:
        more = f" and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
        raise CorpusError(f"cannot read {unreadable[0]}{more}: permission denied")
    if any(p.suffix == ".parquet" for p in paths):
        require("pyarrow.parquet", "data", "reading .parquet files", error=CorpusError)
    single = paths[0] if len(paths) == 1 and paths[0].suffix == ".txt" else None
    size = sum(p.stat().st_size for p in paths)
    documents = lambda: _file_documents(paths, text_column)  # noqa: E731
    return Corpus(str(path), documents, single_file=single, text_bytes=size, version=_files_version(paths))
