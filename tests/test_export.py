import json
import sys
from dataclasses import fields

import pytest
import torch
import torch.distributed as dist

from gptrain import export, hf
from gptrain.checkpoint import RunRecord, load_checkpoint, save_checkpoint
from gptrain.config import GPTConfig
from gptrain.data import DataError, read_meta
from gptrain.distributed import DistInfo
from gptrain.sampling import generate_tokens
from gptrain.hf import TOKENIZER_RECORD
from gptrain.model import GPT, mlp_width
from gptrain.tokenizer import GPT2Tokenizer, from_meta, train_bpe
from gptrain.train import build, train

transformers = pytest.importorskip("transformers")  # gptrain[hf]; gptrain.export itself imports it lazily

LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
CHARS = {"name": "char", "chars": "".join(chr(ord("0") + i) for i in range(64))}


def random_model(**switches) -> GPT:
    """A tiny model with every parameter random, norm gains and biases included, so that a weight mapped to
    the wrong place, or left at Hugging Face's initial value, changes the logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 64,
                             **switches})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if p.dim() == 1 and name.endswith("weight") else 0.0, 0.3)  # norm gains around 1
    return model


def save(model: GPT, path, tokenizer: dict | None = CHARS, sharded: bool = False):
    """A checkpoint as training writes it (run state, model config, tokenizer, weights), on one process."""
    save_checkpoint(path.parent, model=model, record=RunRecord(tokenizer=tokenizer), info=DistInfo(), sharded=sharded)
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `gptrain export ARGS`."""
    capsys.readouterr()
    try:
        export.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def exported(capsys, tmp_path, model: GPT, tokenizer: dict | None = CHARS):
    """Export `model` through the command and load the directory with transformers, checking every weight
    in the file is one Hugging Face expected and none it expected is missing."""
    out = tmp_path / "hf"
    code, stdout, stderr = run(capsys, "--model_path", str(save(model, tmp_path / "ckpt.pt", tokenizer)),
                               "--out", str(out))
    assert code == 0, stderr
    assert stdout.startswith("wrote ") and len(stdout.splitlines()) == 1
    if tokenizer:
        assert stdout.endswith(f" and the '{tokenizer['name']}' tokenizer to {out}\n")
    else:
        assert "no tokenizer files are written" in stderr
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval(), out


def assert_same_model(ours: GPT, theirs) -> None:
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))  # the whole context
    with torch.no_grad():
        our_logits, _ = ours(idx, idx)  # with targets, every position's logits
        their_logits = theirs(idx).logits
    assert (our_logits - their_logits).abs().max().item() < 1e-4
    prompt = idx[:, :5]
    our_tokens = torch.cat(list(generate_tokens(ours, prompt, 20, temperature=0)), dim=1)
    their_tokens = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                   do_sample=False)[:, 5:]
    assert len({tuple(row) for row in our_tokens.tolist()}) == 2  # rows differ, so a mix-up would show
    assert torch.equal(our_tokens, their_tokens)


def val_losses(history: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in history if "val/loss" in r}


@pytest.mark.parametrize("switches", [{}, {"bias": False}, {"tie_embeddings": False}, {"zero_init_proj": True}],
                         ids=["gpt2", "no-bias", "untied", "zero-init-proj"])
def test_a_gpt2_shaped_model_exports_as_hugging_face_gpt2(capsys, tmp_path, switches):
    model = random_model(**switches)
    hf, _ = exported(capsys, tmp_path, model)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == model.config.tie_embeddings
    assert_same_model(model, hf)


@pytest.mark.parametrize("switches", [{}, {"tie_embeddings": False}, {"bias": True}, {"rope_theta": 500.0}],
                         ids=["llama", "untied", "bias", "rope-theta"])
def test_rope_rmsnorm_swiglu_exports_as_hugging_face_llama(capsys, tmp_path, switches):
    model = random_model(**{**LLAMA, **switches})
    hf, _ = exported(capsys, tmp_path, model)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == model.config.tie_embeddings
    assert_same_model(model, hf)


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, which writing DCP shards needs."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_checkpoint_with_its_weights_in_dcp_shards_exports(capsys, tmp_path, process_group):
    """The layout an FSDP run writes: the run state in ckpt.pt, the weights in a DCP folder beside it."""
    model = random_model(**LLAMA)
    path = save(model, tmp_path / "ckpt.pt", sharded=True)
    assert (tmp_path / "ckpt-000000.dcp").is_dir()
    code, _, err = run(capsys, "--model_path", str(path), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert_same_model(model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval())


def test_gpt2_config_records_our_shape_and_the_tokenizers_end_of_text(capsys, tmp_path):
    bpe = train_bpe(["hello world, the quick brown fox"] * 20, vocab_size=300).meta()
    bpe["eot_id"] = 3  # any id: the config records the tokenizer's, not a fixed one
    _, out = exported(capsys, tmp_path, random_model(dropout=0.1, vocab_size=320), tokenizer=bpe)
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("architectures", "n_layer", "n_head", "n_embd", "n_positions", "vocab_size",
                                   "layer_norm_epsilon", "activation_function", "tie_word_embeddings",
                                   "resid_pdrop", "bos_token_id", "eos_token_id")} == {
        "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32,
        "vocab_size": 320, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "tie_word_embeddings": True,
        "resid_pdrop": 0.1, "bos_token_id": 3, "eos_token_id": 3}
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == 3
    # the embedding is padded past the tokenizer's vocabulary: generation must never pick those ids
    assert generation["suppress_tokens"] == list(range(from_meta(bpe).vocab_size, 320))


def test_llama_config_records_our_shape(capsys, tmp_path):
    model = random_model(**LLAMA, rope_theta=500.0, tie_embeddings=False)
    _, out = exported(capsys, tmp_path, model, tokenizer=None)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["intermediate_size"] == mlp_width(model.config) == 128
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 2
    assert config["max_position_embeddings"] == 32 and config["rms_norm_eps"] == 1e-5
    assert config["hidden_act"] == "silu" and config["tie_word_embeddings"] is False
    assert config["attention_bias"] is False and config["mlp_bias"] is False
    assert config["rope_parameters"]["rope_theta"] == 500.0
    assert config["bos_token_id"] is None and config["eos_token_id"] is None  # unknown: no tokenizer recorded


SAMPLE = "Hello, world! The quick brown fox's 3 jumps\n\n  naïve café → 日本語 🙂\tend"


def test_the_gpt2_tokenizer_and_padded_vocabulary_export_so_hugging_face_generates_as_we_do(capsys, tmp_path):
    model = random_model(vocab_size=50304)  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT does
    with torch.no_grad():  # padded rows that would win every argmax unless generation suppresses them
        model.transformer.wte.weight[50257:] *= 50
    hf, out = exported(capsys, tmp_path, model, tokenizer={"name": "gpt2"})
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = GPT2Tokenizer()
    assert tokenizer(SAMPLE)["input_ids"] == ours.encode(SAMPLE)
    assert tokenizer.decode(ours.encode(SAMPLE)) == SAMPLE
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256
    prompt = tokenizer("The meaning of life is", return_tensors="pt")
    their_tokens = hf.generate(**prompt, max_new_tokens=20, do_sample=False)[:, prompt["input_ids"].size(1):]
    our_tokens = torch.cat(list(generate_tokens(model, prompt["input_ids"], 20, temperature=0,
                                                vocab_limit=ours.vocab_size)), dim=1)
    assert torch.equal(our_tokens, their_tokens)
    assert int(their_tokens.max()) < 50257
    assert int(torch.cat(list(generate_tokens(model, prompt["input_ids"], 20, temperature=0)), 1).max()) >= 50257


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_char_and_trained_bpe_tokenizers_export_to_the_same_ids(capsys, tmp_path, kind):
    if kind == "char":
        meta = {"name": "char", "chars": "".join(sorted(set(SAMPLE)))}
    else:
        meta = train_bpe([SAMPLE] * 20, vocab_size=300).meta()
    ours = from_meta(meta)
    _, out = exported(capsys, tmp_path, random_model(vocab_size=320), tokenizer=meta)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer(SAMPLE)["input_ids"] == ours.encode(SAMPLE)
    assert tokenizer.decode(ours.encode(SAMPLE)) == SAMPLE
    assert len(tokenizer) == ours.vocab_size
    assert tokenizer.eos_token_id == ours.eot_id  # None for char: it has no end-of-text token
    assert json.loads((out / TOKENIZER_RECORD).read_text()) == meta  # what init_from=DIR compares the data's with


def test_a_checkpoint_without_a_tokenizer_says_none_is_written(capsys, tmp_path):
    path = save(random_model(), tmp_path / "ckpt.pt", None)
    code, out, err = run(capsys, "--model_path", str(path), "--out", str(tmp_path / "hf"))
    assert code == 0 and out == f"wrote GPT2LMHeadModel to {tmp_path / 'hf'}\n"
    assert err.startswith("note: the checkpoint records no tokenizer, so no tokenizer files are written;")
    assert err.count("\n") == 1
    assert not (tmp_path / "hf" / "tokenizer.json").exists() and not (tmp_path / "hf" / TOKENIZER_RECORD).exists()


def test_exporting_without_a_tokenizer_over_an_export_with_one_removes_its_record(capsys, tmp_path):
    exported(capsys, tmp_path, random_model())
    assert (tmp_path / "hf" / TOKENIZER_RECORD).is_file()
    exported(capsys, tmp_path, random_model(), tokenizer=None)
    assert not (tmp_path / "hf" / TOKENIZER_RECORD).exists()  # it would vouch for a tokenizer the model lacks


def test_a_tokenizer_larger_than_the_model_is_refused(capsys, tmp_path):
    path = save(random_model(), tmp_path / "ckpt.pt", {"name": "gpt2"})  # 64 ids for GPT-2's 50257
    code, _, err = run(capsys, "--model_path", str(path), "--out", str(tmp_path / "hf"))
    assert code == 2 and err == ("error: the checkpoint's 'gpt2' tokenizer has 50257 tokens, more than the "
                                 "model's vocab_size 64\n")


@pytest.mark.parametrize("switches, message", [
    ({"qk_norm": True}, "qk_norm=true has no equivalent in Hugging Face's GPT-2 or Llama; export supports"),
    ({"logit_softcap": 15.0}, "logit_softcap=15.0 has no equivalent in Hugging Face's GPT-2 or Llama;"),
    ({"mlp": "relu2"}, "mlp=relu2 has no equivalent in Hugging Face's GPT-2, the nearest target;"),
    ({"pos_emb": "rope", "norm": "layernorm"}, "pos_emb=rope has no equivalent in Hugging Face's GPT-2,"),
    ({"pos_emb": "learned", "norm": "rmsnorm"}, "norm=rmsnorm has no equivalent in Hugging Face's GPT-2,"),
    ({**LLAMA, "mlp": "relu2"}, "mlp=relu2 has no equivalent in Hugging Face's Llama,"),
    ({**LLAMA, "norm": "layernorm"}, "norm=layernorm has no equivalent in Hugging Face's Llama,"),
    ({**LLAMA, "qk_norm": True, "mlp": "gelu"}, "qk_norm=true, mlp=gelu have no equivalent in Hugging Face's Llama,"),
], ids=["qk_norm", "logit_softcap", "relu2", "rope+layernorm", "learned+rmsnorm", "llama+relu2", "llama+layernorm",
        "two-switches"])
def test_a_model_without_a_hugging_face_twin_is_refused_in_one_line(capsys, tmp_path, switches, message):
    path = save(random_model(**switches), tmp_path / "ckpt.pt")
    code, out, err = run(capsys, "--model_path", str(path), "--out", str(tmp_path / "hf"))
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert err.rstrip().endswith("export supports GPT-2 (learned positions, layernorm, gelu) and Llama "
                                 "(rope, rmsnorm, swiglu)")
    assert not (tmp_path / "hf").exists()


def test_missing_and_foreign_checkpoints_are_one_line_errors(capsys, tmp_path):
    code, _, err = run(capsys, "--model_path", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "hf"))
    assert code == 2 and err == f"error: checkpoint not found: {tmp_path / 'missing.pt'}\n"
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    code, _, err = run(capsys, "--model_path", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "hf"))
    assert code == 2 and err.startswith(f"error: cannot load {tmp_path / 'notes.txt'}") and err.count("\n") == 1


def test_without_transformers_the_error_says_what_to_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    path = save(random_model(), tmp_path / "ckpt.pt")
    code, _, err = run(capsys, "--model_path", str(path), "--out", str(tmp_path / "hf"))
    assert code == 2 and err == 'error: gptrain export needs the transformers package: pip install "gptrain[hf]"\n'


def test_exporting_again_overwrites_an_earlier_export(capsys, tmp_path):
    exported(capsys, tmp_path, random_model())
    second = random_model(**LLAMA)
    hf, _ = exported(capsys, tmp_path, second)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert_same_model(second, hf)


@pytest.mark.parametrize("switches", [
    {}, {"bias": False}, {"tie_embeddings": False}, LLAMA, {**LLAMA, "bias": True}, {**LLAMA, "tie_embeddings": False},
    {**LLAMA, "bias": True, "tie_embeddings": False, "rope_theta": 500.0},
], ids=["gpt2", "gpt2-no-bias", "gpt2-untied", "llama", "llama-bias", "llama-untied", "llama-bias-untied-theta"])
def test_an_exported_model_fine_tunes_from_the_same_model(capsys, tmp_path, tiny_config, char_data, switches):
    """Export, then init_from=DIR: the same shape and switches, bit for bit the same weights, so the same logits.
    Its tokenizer record comes back too, so data prepared as the model's own was is accepted."""
    meta = read_meta(char_data)
    model = random_model(vocab_size=meta["vocab_size"], **switches)
    _, out = exported(capsys, tmp_path, model, tokenizer=meta["tokenizer"])
    run = build(tiny_config(f"init_from={out}"), DistInfo())
    loaded = run.model.eval()
    assert loaded.config == model.config
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    assert [name for name in theirs if not torch.equal(ours[name], theirs[name])] == []
    idx = torch.randint(0, meta["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(idx, idx)[0], model(idx, idx)[0])


def test_an_exported_model_refuses_data_tokenized_otherwise(capsys, tmp_path, tiny_config):
    _, out = exported(capsys, tmp_path, random_model(), tokenizer=CHARS)  # not the characters of char_data
    with pytest.raises(DataError, match="tokenized with 'char' but the checkpoint with a different 'char' tokenizer"):
        build(tiny_config(f"init_from={out}"), DistInfo())


def test_a_llama_trained_here_and_exported_trains_again(capsys, tmp_path, tiny_config, char_data):
    """Train, export as Llama, fine-tune from the directory on the same data: it starts where training ended."""
    recipe = ("pos_emb=rope", "norm=rmsnorm", "mlp=swiglu", "bias=false")
    pretrained = train(tiny_config(*recipe, "max_iters=10", "lr_decay_iters=10", f"out_dir={tmp_path / 'pre'}"))
    code, out, err = run(capsys, "--model_path", str(tmp_path / "pre" / "ckpt.pt"), "--out", str(tmp_path / "hf"))
    assert code == 0 and out.startswith("wrote LlamaForCausalLM and the 'char' tokenizer"), err
    config = tiny_config(*recipe, f"init_from={tmp_path / 'hf'}", "max_iters=6", "lr_decay_iters=6", "eval_interval=3",
                         f"out_dir={tmp_path / 'tuned'}")
    tuned = train(config)
    before, after = (val_losses(history) for history in (pretrained, tuned))
    assert after[0] == pytest.approx(before[10], abs=1e-5)
    assert [r["step"] for r in tuned if "train/loss" in r] == list(range(6))
    assert after[6] < after[3] < after[0]
    saved = load_checkpoint(tmp_path / "tuned" / "ckpt.pt")
    assert saved.progress.step == 6 and saved.record.tokenizer == read_meta(char_data)["tokenizer"]
    assert {k: getattr(saved.model_config, k) for k in ("pos_emb", "norm", "mlp", "bias")} == {
        "pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}


def test_every_model_setting_is_either_mapped_or_refused():
    """A new GPTConfig switch must say in hf.py whether Hugging Face has its equivalent."""
    grouped = {*hf.MAPPED, *hf.INIT_ONLY, *hf.MUST_BE_OFF, *hf.TARGETS["GPT-2"]}
    assert grouped == {f.name for f in fields(GPTConfig)}
