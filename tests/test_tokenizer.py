import json
import socket
from pathlib import Path

import pytest

from gptrain import tokenizer as tok
from gptrain.tokenizer import TokenizerError, from_meta, get_tokenizer

SHAKESPEARE = (Path(__file__).parents[1] / "data" / "tinyshakespeare.txt").read_text()[:50_000]
AWKWARD = "Héllo wörld 🙂\n\n  indented <|endoftext|> 'tis 12345\ttab"


def save_gpt2_as_hf(directory: Path) -> Path:
    """The GPT-2 tokenizer in the layout `save_pretrained` writes, built offline from the shipped files."""
    pytest.importorskip("tokenizers")  # gptrain[data]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.BPE.from_file(str(tok.ASSETS / "encoder.json"), str(tok.ASSETS / "vocab.bpe")))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|endoftext|>"])
    directory.mkdir(parents=True, exist_ok=True)
    t.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory


def rebuilt(t):
    """The tokenizer as a checkpoint would restore it: meta() through JSON, then from_meta()."""
    return from_meta(json.loads(json.dumps(t.meta())))


def test_gpt2_is_exact_and_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the gpt2 tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tok.gpt2_encoding.cache_clear()
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eot_id) == (50257, 50256)
    assert gpt2.encode("<|endoftext|>") != [50256]  # ordinary text, not the special token
    assert gpt2.decode(gpt2.encode(AWKWARD)) == AWKWARD
    assert rebuilt(gpt2).encode(SHAKESPEARE) == gpt2.encode(SHAKESPEARE)


def test_char_round_trip_and_unknown_character():
    char = get_tokenizer("char", [SHAKESPEARE])
    assert char.vocab_size == len(set(SHAKESPEARE)) and char.eot_id is None
    assert char.decode(char.encode(SHAKESPEARE)) == SHAKESPEARE
    assert rebuilt(char).encode("First Citizen") == char.encode("First Citizen")
    with pytest.raises(TokenizerError, match="not in this char tokenizer"):
        char.encode("🙂")


def test_bpe_trains_encodes_and_decodes():
    pytest.importorskip("tokenizers")  # gptrain[data]
    bpe = get_tokenizer("bpe", [SHAKESPEARE], vocab_size=600)
    assert bpe.vocab_size == 600 and bpe.eot_id == 0
    ids = bpe.encode(AWKWARD)
    assert bpe.decode(ids) == AWKWARD and bpe.eot_id not in ids
    assert len(bpe.encode(SHAKESPEARE)) < len(SHAKESPEARE.encode()) / 2  # it learned merges
    again = rebuilt(bpe)
    assert again.encode(AWKWARD) == ids and again.decode(ids) == AWKWARD
    with pytest.raises(TokenizerError, match="too small"):
        get_tokenizer("bpe", [SHAKESPEARE], vocab_size=100)


def test_hf_tokenizer_from_local_directory_matches_gpt2(tmp_path):
    hf = get_tokenizer(f"hf:{save_gpt2_as_hf(tmp_path / 'gpt2')}")
    gpt2 = get_tokenizer("gpt2")
    assert hf.encode(SHAKESPEARE) == gpt2.encode(SHAKESPEARE)
    assert hf.encode(AWKWARD) == gpt2.encode(AWKWARD)
    assert (hf.vocab_size, hf.eot_id) == (50257, 50256)
    (tmp_path / "gpt2" / "tokenizer.json").unlink()  # meta() is self-contained: the files may go
    assert rebuilt(hf).decode(gpt2.encode(AWKWARD)) == AWKWARD


@pytest.mark.parametrize("spec", ["gpt3", "bpe", "char"])
def test_bad_specs_are_clear(spec):
    if spec == "bpe":
        pytest.importorskip("tokenizers")  # without it, bpe's error names the missing package instead
    with pytest.raises(TokenizerError, match="unknown tokenizer|built from a corpus"):
        get_tokenizer(spec)
