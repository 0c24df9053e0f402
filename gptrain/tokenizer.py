"""Tokenizers behind one small interface: char, gpt2 (tiktoken), bpe (trained) and hf:NAME.

Every tokenizer can describe itself with `meta()`, a JSON-serializable dict that is enough to
rebuild it with nothing else on disk. `prepare` stores it in meta.json and training stores it in
checkpoints, so generation decodes correctly even after the data directory has moved.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np

from gptrain.errors import UserError
from gptrain.extras import require

ASSETS = Path(__file__).parent / "assets" / "gpt2"
END_OF_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenization regex (Radford et al. 2019): contractions, letters, digits, punctuation, spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Names hub tokenizers commonly give their end-of-text token, tried when no eos_token is configured.
EOT_CANDIDATES = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>")


class TokenizerError(UserError):
    """A tokenizer spec or text the tokenizer cannot handle; the message is meant for the user."""


class Tokenizer(ABC):
    name: str
    vocab_size: int
    eot_id: int | None  # appended after every document by `prepare`; None for char

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; special-token strings in the text are encoded as plain text."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def meta(self) -> dict:
        """A JSON-serializable, self-contained description that `from_meta` rebuilds from."""

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array: prepare's hot path, overridden where a list can be skipped."""
        return np.array(self.encode(text), dtype=np.uint32)


class CharTokenizer(Tokenizer):
    """One id per character, the table built from the corpus (nanoGPT's shakespeare_char)."""

    name = "char"
    eot_id = None

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_corpus(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(f"character {e.args[0]!r} is not in this char tokenizer's vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def meta(self) -> dict:
        return {"name": "char", "chars": self.chars}


@lru_cache(maxsize=1)
def gpt2_encoding():
    """GPT-2's BPE from the shipped files, so it never touches the network (about 0.2 s to build)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(ASSETS / "vocab.bpe"), str(ASSETS / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={END_OF_TEXT: 50256}, explicit_n_vocab=50257
    )


class GPT2Tokenizer(Tokenizer):
    """The exact GPT-2 BPE via tiktoken: 50257 ids, end-of-text 50256."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def encode(self, text: str) -> list[int]:
        return gpt2_encoding().encode_ordinary(text)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        # No special tokens allowed or disallowed: the same ids as encode_ordinary, without a list.
        return gpt2_encoding().encode_to_numpy(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return gpt2_encoding().decode(ids)

    def meta(self) -> dict:
        return {"name": "gpt2"}


def _tokenizers(spec: str) -> ModuleType:
    """The `tokenizers` package, which bpe and hf: tokenizers run on."""
    return require("tokenizers", "data", f"the {spec} tokenizer", error=TokenizerError)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer: one trained by `train_bpe` or loaded by `hf:NAME_OR_PATH`.

    meta() embeds the tokenizer's whole JSON, so it rebuilds without the hub or the original files.
    """

    def __init__(self, name: str, tokenizer_json: str, eot_id: int | None):
        self.name = name
        self.eot_id = eot_id
        self._tok = _tokenizers(name).Tokenizer.from_str(tokenizer_json)
        # Text that happens to contain "<|endoftext|>" is data, not a document boundary.
        self._tok.encode_special_tokens = True
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def meta(self) -> dict:
        return {"name": self.name, "tokenizer_json": self._tok.to_str(), "eot_id": self.eot_id}


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style, so any text is encodable) with `<|endoftext|>` as id 0."""
    tk = _tokenizers("bpe")
    if vocab_size < 257:
        raise TokenizerError(f"--vocab_size {vocab_size} is too small for a byte-level BPE (at least 257)")
    tok = tk.Tokenizer(tk.models.BPE())
    # No prefix space: encoding documents one by one then concatenating equals encoding the whole.
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer("bpe", tok.to_str(), tok.token_to_id(END_OF_TEXT))


def _load_hf(name_or_path: str) -> HFTokenizer:
    """Load tokenizer.json from a directory, a file, or the hub, and find its end-of-text token."""
    _Tokenizer = _tokenizers(f"hf:{name_or_path}").Tokenizer
    path = Path(name_or_path)
    config_file = path / "tokenizer_config.json" if path.is_dir() else None
    try:
        if path.is_dir():
            tok = _Tokenizer.from_file(str(path / "tokenizer.json"))
        elif path.is_file():
            tok = _Tokenizer.from_file(str(path))
        else:
            tok = _Tokenizer.from_pretrained(name_or_path)
            config_file = _hub_file(name_or_path, "tokenizer_config.json")
    except Exception as e:  # tokenizers and the hub raise many types; the user needs the name and the reason
        raise TokenizerError(f"cannot load Hugging Face tokenizer {name_or_path!r}: {e}") from None
    config = json.loads(config_file.read_text()) if config_file and config_file.exists() else {}
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    for candidate in (eos, *EOT_CANDIDATES):
        if candidate is not None and tok.token_to_id(candidate) is not None:
            return HFTokenizer(f"hf:{name_or_path}", tok.to_str(), tok.token_to_id(candidate))
    raise TokenizerError(f"tokenizer {name_or_path!r} has no end-of-text token: no eos_token, none of {EOT_CANDIDATES}")


def _hub_file(repo: str, filename: str) -> Path | None:
    """A file of a hub repository, or None if it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename))
    except EntryNotFoundError:
        return None


def check_spec(spec: str) -> None:
    """Fail before any corpus is read if `spec` names no tokenizer or one whose package is missing."""
    if spec == "bpe" or spec.startswith("hf:"):
        _tokenizers(spec)
    elif spec not in ("gpt2", "char"):
        raise TokenizerError(f"unknown tokenizer {spec!r}; use gpt2, char, bpe or hf:NAME_OR_PATH")


def get_tokenizer(spec: str, texts: Iterable[str] | None = None, vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer from its command-line spec; `char` and `bpe` learn from `texts`."""
    check_spec(spec)
    if spec == "gpt2":
        return GPT2Tokenizer()
    if spec.startswith("hf:"):
        return _load_hf(spec[3:])
    if texts is None:
        raise TokenizerError(f"tokenizer {spec!r} is built from a corpus; pass its texts")
    if spec == "char":
        return CharTokenizer.from_corpus(texts)
    if vocab_size is None:
        raise TokenizerError("tokenizer 'bpe' needs a vocabulary size (--vocab_size)")
    return train_bpe(texts, vocab_size)


def from_meta(meta: dict) -> Tokenizer:
    """Rebuild the tokenizer that `meta()` described (as stored in meta.json and checkpoints)."""
    name = meta["name"]
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        return CharTokenizer(meta["chars"])
    if name == "bpe" or name.startswith("hf:"):
        return HFTokenizer(name, meta["tokenizer_json"], meta["eot_id"])
    raise TokenizerError(f"unknown tokenizer {name!r} in metadata")
