"""Hugging Face GPT-2 and Llama weights in, from a directory or by name from the hub's cache (no network: tiny
models with every parameter random, saved locally), and fine-tuning on a shorter context than the source's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptrain.checkpoint import CheckpointError, load_checkpoint
from gptrain.config import ConfigError
from gptrain.data import DataError, read_meta
from gptrain.distributed import DistInfo
from gptrain.hf import load_hf
from gptrain.model import GPT
from gptrain.train import build, train

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def val_losses(history: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in history if "val/loss" in r}


def randomised(model):
    """Every parameter drawn at random, biases and norm gains included, each tensor about its own mean with its
    own spread. Hugging Face starts biases at 0 and gains at 1, so at its initialisation a bias dropped or two
    norms swapped would leave the logits as they were; here any weight out of place changes them."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            gain = p.dim() == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=generator) * (0.1 + 0.01 * i) + (1.0 if gain else 0.0) + 0.01 * i)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A 2-layer, 32-wide GPT-2 with 64 positions and every parameter random, as save_pretrained writes it."""
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    path = tmp_path_factory.mktemp("hf_gpt2")
    randomised(transformers.GPT2LMHeadModel(config)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    """A little tiny-shakespeare in GPT-2's tokens, prepared by the real `gptrain prepare`."""
    from gptrain.prepare import main as prepare

    root = tmp_path_factory.mktemp("shakespeare_gpt2")
    corpus = root / "input.txt"
    corpus.write_text((Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt").read_text()[:60_000])
    prepare(["--input", str(corpus), "--tokenizer", "gpt2", "--num_proc", "1", "--out_dir", str(root / "data")])
    return root / "data"


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_computes_what_transformers_does(path) -> GPT:
    """Load `path` as init_from would into our model, and compare its logits with transformers' at every
    position of a batch of random ids over the whole context."""
    config, state, _ = load_hf(str(path))
    model = GPT(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.randint(0, config.vocab_size, (2, config.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(x, x)  # with targets: logits at every position
        theirs = hf_model(path)(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    return model


def transformers_val_loss(path, run) -> float:
    """transformers' loss on the batches the run evaluates on, for the model saved at `path`."""
    reference, sampler = hf_model(path), run.eval_batches["val"]
    with torch.no_grad():
        return sum(F.cross_entropy(reference(x).logits.flatten(0, 1), y.reshape(-1)).item()
                   for x, y in (sampler.batch(0, i) for i in range(run.config.eval_iters))) / run.config.eval_iters


def test_the_loaded_gpt2_computes_what_transformers_does(hf_dir):
    config = assert_computes_what_transformers_does(hf_dir).config
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == (2, 2, 32, 64, 50257)
    assert config.bias and config.tie_embeddings


def test_a_hugging_face_gpt2_reads_gpt2_tokens_only_if_its_vocabulary_holds_them(hf_dir, tmp_path):
    assert load_hf(str(hf_dir))[2] == {"name": "gpt2"}
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=100)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    assert load_hf(str(tmp_path))[2] is None  # some other tokenizer's: training takes the data's


@pytest.mark.parametrize("bias, tied", [(False, False), (True, True)], ids=["llama", "bias-tied"])
def test_a_hugging_face_llama_computes_what_transformers_does(tmp_path, bias, tied):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=100, max_position_embeddings=48, rms_norm_eps=1e-5,
                                      attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tied,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    randomised(transformers.LlamaForCausalLM(config)).save_pretrained(tmp_path)
    ours = assert_computes_what_transformers_does(tmp_path).config
    assert (ours.pos_emb, ours.norm, ours.mlp, ours.rope_theta, ours.block_size) == ("rope", "rmsnorm", "swiglu", 500.0, 48)
    assert (ours.bias, ours.tie_embeddings) == (bias, tied)
    assert load_hf(str(tmp_path))[2] is None  # no tokenizer record: training takes the data's


def test_fine_tuning_a_hugging_face_llama_records_the_datas_tokenizer(tiny_config, char_data, tmp_path):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=80, max_position_embeddings=64, rms_norm_eps=1e-5)
    randomised(transformers.LlamaForCausalLM(config)).save_pretrained(tmp_path / "llama")
    config = tiny_config(f"init_from={tmp_path / 'llama'}", "max_iters=2", "eval_interval=2")  # block_size=32
    expected = transformers_val_loss(tmp_path / "llama", build(config, DistInfo()))
    history = train(config)
    assert val_losses(history)[0] == pytest.approx(expected, abs=1e-4)
    saved = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert saved.record.tokenizer == read_meta(char_data)["tokenizer"]
    assert (saved.model_config.pos_emb, saved.model_config.block_size) == ("rope", 32)


def test_fine_tuning_a_hugging_face_gpt2_starts_at_iteration_0_from_its_weights(tiny_config, gpt2_data, hf_dir, tmp_path):
    config = tiny_config(f"data_dir={gpt2_data}", f"init_from={hf_dir}", "block_size=64", "max_iters=2",
                         "eval_interval=2", "dropout=0.1")
    run = build(config, DistInfo())
    assert run.state.progress.step == 0 and run.model.config.dropout == 0.1 and run.tokenizer_meta == {"name": "gpt2"}
    expected = transformers_val_loss(hf_dir, run)

    history = train(config)
    assert val_losses(history)[0] == pytest.approx(expected, abs=1e-4)
    assert [r["step"] for r in history if "train/loss" in r] == [0, 1]
    saved = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert saved.progress.step == 2 and saved.record.tokenizer == {"name": "gpt2"}
    assert saved.model_config.n_layer == 2 and saved.model_config.block_size == 64


def test_a_shorter_context_crops_the_position_table(tiny_config, gpt2_data, hf_dir, tmp_path):
    config = tiny_config(f"data_dir={gpt2_data}", f"init_from={hf_dir}", "block_size=32", "max_iters=2",
                         "eval_interval=2")
    run = build(config, DistInfo())
    _, state, _ = load_hf(str(hf_dir))
    assert torch.equal(run.model.transformer.wpe.weight.detach(), state["transformer.wpe.weight"][:32])
    history = train(config)
    assert all(torch.isfinite(torch.tensor(v)) for v in val_losses(history).values())
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt").model_config.block_size == 32


def test_a_longer_context_than_the_source_has_is_one_line(tiny_config, gpt2_data, hf_dir):
    with pytest.raises(ConfigError, match=r"^block_size=128 is larger than the 64 learned positions of .*; "
                                          r"set block_size <= 64$"):
        build(tiny_config(f"data_dir={gpt2_data}", f"init_from={hf_dir}", "block_size=128"), DistInfo())


def test_a_hugging_face_gpt2_needs_gpt2_tokens(tiny_config, hf_dir):
    with pytest.raises(DataError, match="tokenized with 'char' but the checkpoint with a different 'gpt2'"):
        build(tiny_config(f"init_from={hf_dir}", "block_size=64"), DistInfo())


def test_another_architecture_is_refused_in_one_line(tmp_path):
    transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"^\S+ holds a 'gpt_neox' model; init_from takes GPT-2 or Llama \(gpt2, "
                                              r"gpt2-medium, gpt2-large, gpt2-xl or a directory of one\)$"):
        load_hf(str(tmp_path))


LLAMA = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
         "vocab_size": 100, "rms_norm_eps": 1e-5}


@pytest.mark.parametrize("config, differs", [
    (transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, activation_function="gelu"),
     "GPT-2 variant gptrain's model does not compute: activation_function=gelu"),
    (transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, layer_norm_epsilon=1e-6, n_inner=64),
     "GPT-2 variant gptrain's model does not compute: n_inner=64, layer_norm_epsilon=1e-06"),
    (transformers.LlamaConfig(**{**LLAMA, "num_key_value_heads": 1}),
     "Llama variant gptrain's model does not compute: num_key_value_heads=1 (grouped-query attention)"),
    (transformers.LlamaConfig(**{**LLAMA, "intermediate_size": 96, "rms_norm_eps": 1e-6}),
     "Llama variant gptrain's model does not compute: intermediate_size=96 (ours is 128 at hidden_size=32), "
     + "rms_norm_eps=1e-06"),
    (transformers.LlamaConfig(**LLAMA, hidden_act="gelu", attention_bias=True,
                              rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "Llama variant gptrain's model does not compute: hidden_act=gelu, attention_bias=True with mlp_bias=False, "
     + "rope_type=linear"),
], ids=["gelu", "gpt2-width-eps", "gqa", "llama-width-eps", "act-bias-rope"])
def test_a_variant_our_model_does_not_compute_is_refused_in_one_line(tmp_path, config, differs):
    config.save_pretrained(tmp_path)  # refused from config.json alone, before any weights are read
    with pytest.raises(CheckpointError) as e:
        load_hf(str(tmp_path))
    assert str(e.value) == f"{tmp_path} is a {differs}"


def test_openai_gpt2_offline_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(CheckpointError) as e:
        load_hf("gpt2")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("cannot load the Hugging Face model gpt2 (") and "a local directory" in message


def test_init_from_gpt2_by_name_loads_it_from_the_hugging_face_cache(tiny_args, tiny_config, gpt2_data, hf_dir,
                                                                     tmp_path):
    """The by-name path as a user runs it: train.py asks transformers for 'gpt2', and transformers' own cache
    lookup finds it. Offline, with a cache of its own holding a random GPT-2 under that name, the weights can
    have come from nowhere else."""
    commit = "c0ffee" * 6 + "0123"  # a snapshot's name is the commit it was downloaded at
    repo = tmp_path / "hub" / "models--gpt2"
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (repo / "snapshots" / commit / name).write_bytes((hf_dir / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [f"data_dir={gpt2_data}", "init_from=gpt2", "max_iters=2", "eval_interval=2"]
    result = subprocess.run([sys.executable, "train.py", *tiny_args(*args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "fine-tuning from gpt2 (iter 0)" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # the same batches, through transformers' model loaded from the file the cache holds
    run = build(tiny_config(*args[:1], f"init_from={hf_dir}", f"out_dir={tmp_path / 'reference'}"), DistInfo())
    assert val_losses(records)[0] == pytest.approx(transformers_val_loss(repo / "snapshots" / commit, run), abs=1e-4)
    assert [r["step"] for r in records if "train/loss" in r] == [0, 1]
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt").record.tokenizer == {"name": "gpt2"}


def test_init_from_accepts_gpt2_names_and_hugging_face_directories(tiny_config, hf_dir, tmp_path):
    assert tiny_config("init_from=gpt2-medium").init_from == "gpt2-medium"
    assert tiny_config(f"init_from={hf_dir}").init_from == str(hf_dir)
    with pytest.raises(ConfigError, match="init_from must be .*Hugging Face GPT-2 (or Llama )?directory"):
        tiny_config(f"init_from={tmp_path}")  # a directory, but no config.json


@pytest.mark.parametrize("recipe", [(), ("pos_emb=rope",)], ids=["learned", "rope"])
def test_fine_tuning_our_checkpoint_on_a_shorter_context(tiny_config, tmp_path, recipe):
    train(tiny_config(*recipe, "max_iters=4", "eval_interval=4", f"out_dir={tmp_path / 'pre'}"))  # block_size 32
    pretrained = load_checkpoint(tmp_path / "pre" / "ckpt.pt")
    config = tiny_config(*recipe, f"init_from={tmp_path / 'pre' / 'ckpt.pt'}", "block_size=16", "max_iters=2",
                         "eval_interval=2", f"out_dir={tmp_path / 'ft'}")
    run = build(config, DistInfo())
    assert run.model.config.block_size == 16
    if recipe:
        assert run.model.transformer.h[0].attn.rotary.table.shape[1] == 16
    else:
        assert torch.equal(run.model.transformer.wpe.weight.detach(),
                           pretrained.tensors["model"]["transformer.wpe.weight"][:16])
    train(config)
    assert load_checkpoint(tmp_path / "ft" / "ckpt.pt").model_config.block_size == 16
