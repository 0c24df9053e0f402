"""GPT-2 weights in from a Hugging Face directory (no network: a random tiny GPT-2 saved locally), and
fine-tuning on a shorter context than the source's."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptrain.checkpoint import CheckpointError, load_checkpoint
from gptrain.config import ConfigError
from gptrain.data import DataError
from gptrain.distributed import DistInfo
from gptrain.hf import load_hf_gpt2
from gptrain.model import GPT
from gptrain.train import build, train

transformers = pytest.importorskip("transformers")


def val_losses(history: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in history if "val/loss" in r}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A randomly initialised 2-layer, 32-wide GPT-2 with 64 positions, as save_pretrained writes it."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    path = tmp_path_factory.mktemp("hf_gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
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
    return transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()


def test_the_loaded_model_computes_what_transformers_does(hf_dir):
    config, state = load_hf_gpt2(str(hf_dir))
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == (2, 2, 32, 64, 50257)
    model = GPT(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(x, x)  # with targets: logits at every position
        theirs = hf_model(hf_dir)(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_fine_tuning_a_hugging_face_gpt2_starts_at_iteration_0_from_its_weights(tiny_config, gpt2_data, hf_dir, tmp_path):
    config = tiny_config(f"data_dir={gpt2_data}", f"init_from={hf_dir}", "block_size=64", "max_iters=2",
                         "eval_interval=2", "dropout=0.1")
    run = build(config, DistInfo())
    assert run.state.progress.step == 0 and run.model.config.dropout == 0.1 and run.tokenizer_meta == {"name": "gpt2"}
    reference, sampler = hf_model(hf_dir), run.eval_batches["val"]
    with torch.no_grad():  # transformers' loss on the batches the run evaluates on
        expected = sum(F.cross_entropy(reference(x).logits.flatten(0, 1), y.reshape(-1)).item()
                       for x, y in (sampler.batch(0, i) for i in range(config.eval_iters))) / config.eval_iters

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
    _, state = load_hf_gpt2(str(hf_dir))
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
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=100)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a 'llama' model; init_from takes GPT-2 only"):
        load_hf_gpt2(str(tmp_path))


def test_openai_gpt2_offline_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(CheckpointError) as e:
        load_hf_gpt2("gpt2")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("cannot load the Hugging Face model gpt2 (") and "a local directory" in message


def test_init_from_accepts_gpt2_names_and_hugging_face_directories(tiny_config, hf_dir, tmp_path):
    assert tiny_config("init_from=gpt2-medium").init_from == "gpt2-medium"
    assert tiny_config(f"init_from={hf_dir}").init_from == str(hf_dir)
    with pytest.raises(ConfigError, match="init_from must be .*Hugging Face GPT-2 directory"):
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
