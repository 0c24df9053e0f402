"""`gptrain prepare`: turn a text corpus into train.bin / val.bin token files plus metadata.

The pipeline, one function each:
  documents from a source (sources.py: text files, JSON lines, Parquet, a `datasets` directory or a hub
  dataset) -> split into train / val -> chunks of ~4 MB of text -> tokenized by worker processes ->
  appended in order to train.bin.tmp / val.bin.tmp -> renamed, then meta.pkl and last meta.json written.

The .bin files are raw token ids (uint16 when the vocabulary fits, else uint32), no header, the
layout nanoGPT reads. Memory stays bounded: the corpus is read lazily and only a few chunks are in
flight at once. Since meta.json comes last, a directory with meta.json is a finished dataset. An
interrupted run leaves its .tmp files and a progress record; the next run with the same settings
resumes from there, one with other settings starts over.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import itertools
import json
import multiprocessing
import os
import pickle
import random
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptrain import sources
from gptrain.errors import UserError, command
from gptrain.files import atomic_write, atomic_write_text, publish, remove_temporaries
from gptrain.sources import Corpus, CorpusError, Document
from gptrain.tokenizer import CharTokenizer, Tokenizer, check_spec, from_meta, get_tokenizer

CHUNK_CHARS = 4 << 20  # text per worker task: large enough to amortize pickling, small enough for RAM
SPLITS = ("train", "val")
PROGRESS = "prepare-progress.json"  # in --out_dir while a run is unfinished: how far its .tmp files are valid
METADATA = ("meta.json", "meta.pkl", "tokenizer.json")  # written once the token files are complete
CHECKPOINT_SECONDS = 10.0  # how often that record is updated (each time costs an fsync)


class PrepareError(UserError):
    """A problem with the user's input or environment; `main` prints it as one line and exits 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptrain prepare",
        description="Tokenize a corpus into train.bin / val.bin / meta.json / meta.pkl in --out_dir.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", help="a local .txt, .jsonl or .parquet file, a directory of them, or a datasets save_to_disk dir"
    )
    source.add_argument("--dataset", help="a Hugging Face hub dataset name, e.g. Skylion007/openwebtext")
    p.add_argument("--config", help="the hub dataset's configuration name, if it has several")
    p.add_argument("--split", default="train", help="which split of the dataset to read (default: train)")
    p.add_argument("--text_column", default="text", help="the column or JSON field holding the text (default: text)")
    p.add_argument("--streaming", action="store_true", help="stream the hub dataset instead of downloading it first")
    p.add_argument("--cache_dir", help="where the datasets library caches hub downloads (default: its own)")
    p.add_argument("--out_dir", required=True, help="directory for train.bin, val.bin, meta.json and meta.pkl")
    p.add_argument(
        "--tokenizer", default="gpt2", help="gpt2, char (from the corpus), bpe (trained on it) or hf:NAME_OR_PATH"
    )
    p.add_argument("--vocab_size", type=int, default=8192, help="vocabulary size for --tokenizer bpe (default: 8192)")
    p.add_argument(
        "--dtype", choices=("auto", "uint16", "uint32"), default="auto",
        help="token id type; auto picks uint16 when the vocabulary fits in 65536 ids",
    )
    p.add_argument(
        "--val_fraction", type=float, default=0.1,
        help="share held out for validation: the tail of a single text file, else a random share of documents",
    )
    p.add_argument("--seed", type=int, default=2357, help="seed for choosing the validation documents")
    p.add_argument("--max_docs", type=int, help="read only the first N documents, for a quick subset")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    p.add_argument(
        "--start_method", choices=multiprocessing.get_all_start_methods(),
        help="how tokenizer processes start (default: fork on Linux unless torch is loaded, else spawn)",
    )
    p.add_argument("--overwrite", action="store_true", help="rebuild even if --out_dir holds a finished dataset")
    return p


def open_corpus(args: argparse.Namespace) -> Corpus:
    """The corpus --dataset or --input names."""
    if args.dataset:
        return sources.open_hub(args.dataset, config=args.config, split=args.split, text_column=args.text_column,
                                streaming=args.streaming, cache_dir=args.cache_dir, num_proc=args.num_proc)
    return sources.open_local(args.input, split=args.split, text_column=args.text_column)


# ---------------------------------------------------------------------------------------------
# Splitting and chunking, both deterministic so that a resumed run sees the same chunks.


def split_documents(
    corpus: Corpus, val_fraction: float, seed: int, max_docs: int | None
) -> Iterator[tuple[str, Document]]:
    """Yield (split, document) pairs.

    A single text file keeps nanoGPT's shakespeare layout: the first (1 - val_fraction) of its bytes
    is one training document, the rest one validation document. Otherwise each document goes to val
    with probability val_fraction (seeded); the first document always goes to val and the second to
    train, so both splits exist even for a streamed corpus of unknown length.
    """
    if corpus.single_file is not None:
        train, val = sources.head_and_tail(corpus.single_file, 1 - val_fraction)
        yield "train", train
        yield "val", val
        return
    rng = random.Random(seed)
    for i, doc in enumerate(itertools.islice(corpus.documents(), max_docs)):
        held_out = rng.random() < val_fraction
        yield ("val" if i == 0 or (i > 1 and held_out) else "train"), doc


def _chunks(docs: Iterable[tuple[str, Document]]) -> Iterator[list[tuple[str, str, bool]]]:
    """Group documents into lists of (split, text piece, ends_document) holding ~CHUNK_CHARS of text."""
    chunk, size = [], 0
    for split, doc in docs:
        pieces = (piece for piece in doc if piece)  # an empty document carries nothing, not even an eot
        piece = next(pieces, None)
        while piece is not None:
            following = next(pieces, None)
            chunk.append((split, piece, following is None))
            size += len(piece)
            if size >= CHUNK_CHARS:
                yield chunk
                chunk, size = [], 0
            piece = following
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# Tokenizing in worker processes; the main process appends their results in order.

_worker: dict = {}  # each worker process's tokenizer and output dtype, set by _init_worker


def _init_worker(tokenizer_meta: dict, dtype: str) -> None:
    _worker["tokenizer"] = from_meta(tokenizer_meta)
    _worker["dtype"] = dtype
    threading.Thread(target=_exit_with_parent, daemon=True).start()


def _exit_with_parent() -> None:
    """Idle workers of a killed (SIGKILL) run would wait forever on their queue; end them instead.

    The parent's sentinel works under every start method; os.getppid() would name the server under
    forkserver, and never changes on Windows.
    """
    multiprocessing.parent_process().join()
    os._exit(1)


def _tokenize_chunk(chunk: list[tuple[str, str, bool]]) -> tuple[dict, dict[str, np.ndarray]]:
    """Per split: the counts, and the ids with an end-of-text after each document."""
    tokenizer = _worker["tokenizer"]
    eot = np.array([] if tokenizer.eot_id is None else [tokenizer.eot_id], dtype=np.uint32)
    parts = {split: [eot[:0]] for split in SPLITS}
    stats = {split: {"tokens": 0, "documents": 0, "text_bytes": 0} for split in SPLITS}
    for split, text, ends_document in chunk:
        parts[split].append(tokenizer.encode_to_numpy(text))
        stats[split]["text_bytes"] += len(text.encode("utf-8"))
        if ends_document:
            parts[split].append(eot)
            stats[split]["documents"] += 1
    ids = {split: np.concatenate(parts[split]).astype(_worker["dtype"]) for split in SPLITS}
    for split in SPLITS:
        stats[split]["tokens"] = len(ids[split])
    return stats, ids


class PartialOutput:
    """`train.bin.tmp` and `val.bin.tmp` being appended to, and a progress record to resume from.

    Every CHECKPOINT_SECONDS the .tmp files are fsynced and then the record (settings, chunks done,
    counts) is replaced atomically, so it never claims data that is not on disk. A later run with the
    same settings truncates the files to what the record says and carries on from the next chunk; one
    with other settings starts over, saying which differ. The checksum and the largest id of each split
    cover the kept part too: they are recomputed from its bytes, which the record need not trust.
    """

    def __init__(self, out_dir: Path, settings: dict, dtype: str):
        # Each setting as a short digest: the record stays small, and still names what changed.
        self.settings = {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16]
                         for k, v in settings.items()}
        self.out_dir, self.dtype = out_dir, np.dtype(dtype)
        self.paths = {split: out_dir / f"{split}.bin.tmp" for split in SPLITS}
        state = json.loads((out_dir / PROGRESS).read_text()) if (out_dir / PROGRESS).exists() else {}
        stale = state and self._stale(state)
        if stale:
            print(f"discarding the partial run in {out_dir} ({stale}); starting over", file=sys.stderr)
            state = {}
        self.chunks = state.get("chunks", 0)
        self.stats = state.get("stats") or {split: {"tokens": 0, "documents": 0, "text_bytes": 0} for split in SPLITS}
        self.files, self.digests, self.max_ids = {}, {}, {}
        for split, path in self.paths.items():
            f = open(path, "r+b" if self.chunks else "w+b")
            f.truncate(self.stats[split]["tokens"] * self.dtype.itemsize)  # bytes written past the record go
            self.digests[split], self.max_ids[split] = hashlib.sha256(), -1
            for block in iter(lambda: f.read(1 << 24), b""):
                self._count(split, block)
            self.files[split] = f
        if self.chunks:
            print(f"resuming after {self.chunks} chunks already tokenized in {out_dir}", file=sys.stderr)
        self.saved_at = time.monotonic()

    def _stale(self, state: dict) -> str:
        """Why a progress record cannot be resumed from, or "" if it can."""
        recorded = state.get("settings", {})
        changed = [k for k in self.settings if recorded.get(k) != self.settings[k]]
        if changed:
            return f"its {', '.join(changed)} differ"
        short = [
            path.name for split, path in self.paths.items()
            if not path.exists() or path.stat().st_size < state["stats"][split]["tokens"] * self.dtype.itemsize
        ]
        return f"{' and '.join(short)} missing or shorter than its record" if short else ""

    def _count(self, split: str, data: bytes) -> None:
        self.digests[split].update(data)
        if data:
            self.max_ids[split] = max(self.max_ids[split], int(np.frombuffer(data, self.dtype).max()))

    def append(self, stats: dict, ids: dict[str, np.ndarray]) -> None:
        for split in SPLITS:
            data = ids[split].tobytes()
            self.files[split].write(data)
            self._count(split, data)
        # Counts change only after the bytes are written; an interruption in between leaves
        # extra bytes that the next run truncates away.
        self.stats = {split: {k: v + stats[split][k] for k, v in self.stats[split].items()} for split in SPLITS}
        self.chunks += 1
        if time.monotonic() - self.saved_at >= CHECKPOINT_SECONDS:
            self.checkpoint()

    def checkpoint(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        record = {"settings": self.settings, "chunks": self.chunks, "stats": self.stats}
        atomic_write_text(self.out_dir / PROGRESS, json.dumps(record))
        self.saved_at = time.monotonic()

    def discard(self) -> None:
        """Close and delete the files and the record: a bad input makes them useless to any rerun."""
        for split, f in self.files.items():
            f.close()
            self.paths[split].unlink(missing_ok=True)
        (self.out_dir / PROGRESS).unlink(missing_ok=True)

    def finish(self) -> dict:
        """Close the files; return each split's counts, largest token id and sha256."""
        self.checkpoint()
        for f in self.files.values():
            f.close()
        return {
            split: {**self.stats[split], "max_id": self.max_ids[split], "sha256": self.digests[split].hexdigest()}
            for split in SPLITS
        }


def default_start_method() -> str:
    """fork where it is safe, else spawn.

    fork starts workers at once with the tables the tokenizer built here; spawn re-imports and
    rebuilds them in every worker, 0.4 to 1 s more per run on 2 cores. macOS and Windows have no
    safe fork, and a process that loaded torch (a training script, a notebook) may be running
    thread pools, whose locks a fork would copy without their threads.
    """
    return "fork" if sys.platform == "linux" and "torch" not in sys.modules else "spawn"


def tokenize(
    chunks: Iterable[list], tokenizer: Tokenizer, dtype: str, num_proc: int, output: PartialOutput,
    total_docs: int | None, start_method: str,
) -> None:
    """Tokenize chunks on `num_proc` processes into `output`, in order, skipping those it already holds."""
    done_docs = sum(s["documents"] for s in output.stats.values())
    tokens = 0

    def collect(stats: dict, ids: dict) -> None:
        nonlocal tokens
        output.append(stats, ids)
        tokens += sum(s["tokens"] for s in stats.values())
        bar.update(sum(s["documents"] for s in stats.values()))
        bar.set_postfix_str(f"{tokens / max(bar.format_dict['elapsed'], 1e-9) / 1e6:.2f}M tok/s")

    if start_method == "fork":
        tokenizer.encode("")  # builds its lazy tables (GPT-2's BPE ranks) once, here, for every worker
    context = multiprocessing.get_context(start_method)
    # a bar on a terminal only: in a log it is noise, and the lines below say what was written
    with tqdm(total=total_docs, initial=done_docs, unit="doc", desc="tokenizing", dynamic_ncols=True,
              disable=not sys.stderr.isatty()) as bar, \
            ProcessPoolExecutor(num_proc, context, _init_worker, (tokenizer.meta(), dtype)) as pool:
        in_flight: deque = deque()  # bounded, so a fast reader cannot pile the corpus up in memory
        for chunk in itertools.islice(chunks, output.chunks, None):
            in_flight.append(pool.submit(_tokenize_chunk, chunk))
            if len(in_flight) >= 2 * num_proc:
                collect(*in_flight.popleft().result())
        while in_flight:
            collect(*in_flight.popleft().result())


# ---------------------------------------------------------------------------------------------
# The whole run.


def _choose_dtype(vocab_size: int, requested: str) -> str:
    fits16 = vocab_size <= 1 << 16
    if requested == "uint16" and not fits16:
        raise PrepareError(f"a vocabulary of {vocab_size} ids does not fit --dtype uint16 (at most 65536)")
    if vocab_size > 1 << 32:
        raise PrepareError(f"a vocabulary of {vocab_size} ids does not fit uint32")
    return "uint16" if requested == "auto" and fits16 else ("uint32" if requested == "auto" else requested)


def _check_disk(out_dir: Path, corpus: Corpus, tokenizer: Tokenizer, itemsize: int, max_docs: int | None) -> None:
    """Refuse to start when the output clearly will not fit (estimate: a token per 3 bytes of text, 1 for char)."""
    if corpus.text_bytes is None or (max_docs is not None and corpus.num_docs is None):
        return
    share = 1.0 if max_docs is None else min(1.0, max_docs / max(corpus.num_docs, 1))
    need = corpus.text_bytes * share / (1 if tokenizer.name == "char" else 3) * itemsize * 1.1
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise PrepareError(f"{out_dir} has {free / 1e9:.1f} GB free; the output needs about {need / 1e9:.1f} GB")


def _build_tokenizer(args: argparse.Namespace, corpus: Corpus) -> Tokenizer:
    """The tokenizer; char reads every split (all characters must encode), bpe trains on train only."""
    def texts(splits: tuple[str, ...]) -> Iterator[str]:
        for split, doc in split_documents(corpus, args.val_fraction, args.seed, args.max_docs):
            if split in splits:
                yield from doc

    if args.tokenizer == "char":
        return get_tokenizer("char", texts(SPLITS))
    if args.tokenizer == "bpe":
        print(f"training a {args.vocab_size}-token byte-level BPE on the training split", file=sys.stderr)
        return get_tokenizer("bpe", texts(("train",)), vocab_size=args.vocab_size)
    return get_tokenizer(args.tokenizer)


def _check_args(args: argparse.Namespace) -> None:
    """Every problem with the settings at once, before any corpus is read."""
    problems = []
    if not 0 < args.val_fraction < 1:
        problems.append(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.num_proc is None or args.num_proc < 1:
        problems.append(f"--num_proc must be at least 1, got {args.num_proc}")
    if args.max_docs is not None and args.max_docs < 1:
        problems.append(f"--max_docs must be at least 1, got {args.max_docs}")
    if args.tokenizer == "bpe" and args.vocab_size < 257:
        problems.append(f"--vocab_size must be at least 257 for a byte-level BPE, got {args.vocab_size}")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        problems.append(f"--out_dir {args.out_dir} is a file, not a directory")
    if problems:
        raise PrepareError("; ".join(problems))


def _finish(out_dir: Path, meta: dict, tokenizer: Tokenizer) -> None:
    """Rename the complete token files into place, then write the metadata, meta.json last: whoever sees
    meta.json can trust everything it describes. Each step is on disk before the next starts."""
    for split in SPLITS:  # PartialOutput.finish has synced their data
        publish(out_dir / f"{split}.bin.tmp", out_dir / f"{split}.bin")
    if "tokenizer_json" in meta["tokenizer"]:  # a trained or hub tokenizer, also beside the data for other tools
        atomic_write_text(out_dir / "tokenizer.json", meta["tokenizer"]["tokenizer_json"])
    pickled = dict(meta)
    if isinstance(tokenizer, CharTokenizer):  # the keys nanoGPT's sample.py looks for
        pickled.update(stoi=tokenizer.stoi, itos=dict(enumerate(tokenizer.chars)))
    atomic_write(out_dir / "meta.pkl", lambda f: pickle.dump(pickled, f))
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1))
    (out_dir / PROGRESS).unlink()  # last: a run killed before this is unfinished, and the next rebuilds


def prepare(args: argparse.Namespace) -> dict | None:
    """Run `gptrain prepare`; return the metadata written, or None when the output was already finished."""
    _check_args(args)
    check_spec(args.tokenizer)  # before a hub dataset is downloaded for a tokenizer that cannot run
    out_dir = Path(args.out_dir)
    # A progress record outlives meta.pkl and meta.json, so a run killed while writing them is unfinished;
    # so is a dataset whose .bin files were deleted since (training would send the user back here).
    finished = any((out_dir / name).exists() for name in ("meta.json", "meta.pkl")) and all(
        (out_dir / f"{split}.bin").exists() for split in SPLITS)
    if finished and not (out_dir / PROGRESS).exists() and not args.overwrite:
        print(f"{out_dir} already holds a finished dataset; pass --overwrite to rebuild it")
        return None

    corpus = open_corpus(args)
    tokenizer = _build_tokenizer(args, corpus)
    dtype = _choose_dtype(tokenizer.vocab_size, args.dtype)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_disk(out_dir, corpus, tokenizer, np.dtype(dtype).itemsize, args.max_docs)
    # Only now that the input and settings have passed: from here on old files no longer look finished.
    for name in ("meta.json", "meta.pkl"):
        (out_dir / name).unlink(missing_ok=True)
    for name in (*METADATA, PROGRESS):
        remove_temporaries(out_dir / name)  # what a run killed while writing one left

    # Partial output is reusable only by a run that would cut and tokenize the corpus identically.
    settings = {
        "input": corpus.description, "input_files": corpus.version, "split": args.split, "config": args.config,
        "text_column": args.text_column,
        "val_fraction": args.val_fraction, "seed": args.seed, "max_docs": args.max_docs, "dtype": dtype,
        "chunk_chars": CHUNK_CHARS, "piece_bytes": sources.PIECE_BYTES, "tokenizer": tokenizer.meta(),
    }
    output = PartialOutput(out_dir, settings, dtype)
    chunks = _chunks(split_documents(corpus, args.val_fraction, args.seed, args.max_docs))
    total_docs = corpus.num_docs if args.max_docs is None else min(args.max_docs, corpus.num_docs or args.max_docs)
    try:
        tokenize(chunks, tokenizer, dtype, args.num_proc, output, total_docs, args.start_method or default_start_method())
        totals = output.finish()
        if totals["train"]["tokens"] + totals["val"]["tokens"] == 0:
            raise PrepareError(f"{corpus.description} holds no text")
        for split in SPLITS:
            if totals[split]["tokens"] == 0:
                raise PrepareError(f"the {split} split is empty: {corpus.description} has too little text or documents")
    except (PrepareError, CorpusError):  # the input is at fault (not the disk, whose partial output a rerun resumes)
        output.discard()
        if created:
            out_dir.rmdir()
        raise

    meta = {
        "vocab_size": tokenizer.vocab_size, "dtype": dtype, "eot_id": tokenizer.eot_id, "tokenizer": tokenizer.meta(),
        "train": totals["train"], "val": totals["val"], "source": corpus.description,
        "val_fraction": args.val_fraction, "seed": args.seed, "max_docs": args.max_docs,
    }
    _finish(out_dir, meta, tokenizer)
    for split in SPLITS:
        tokens, documents = totals[split]["tokens"], totals[split]["documents"]
        print(f"{split}: {tokens:,} tokens, {documents:,} documents -> {out_dir / split}.bin")
    return meta


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        prepare(args)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise PrepareError(f"out of disk space in {args.out_dir}; free some and re-run to resume") from None


if __name__ == "__main__":
    main()
