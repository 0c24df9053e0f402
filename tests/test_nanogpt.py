"""A nanoGPT user moves in: a character-level checkpoint written exactly as nanoGPT's train.py writes it, over
data exactly as its shakespeare_char/prepare.py writes it, samples, resumes and fine-tunes with gptrain."""

import math
import pickle
import shutil

import numpy as np
import pytest
import torch

from gptrain.checkpoint import load_checkpoint
from gptrain.config import GPTConfig, load_config
from gptrain.distributed import DistInfo
from gptrain.generate import main as generate
from gptrain.model import GPT
from gptrain.train import build, train

from conftest import ROOT

MODEL_ARGS = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "bias": False, "vocab_size": 65,
              "dropout": 0.2}
ITERS = 200  # nanoGPT's steps before it saved
# nanoGPT's model.named_parameters() for MODEL_ARGS, in its order (the head is tied to wte, so not listed)
NANOGPT_PARAMETERS = ["transformer.wte.weight", "transformer.wpe.weight"] + [
    f"transformer.h.{i}.{name}.weight" for i in range(2)
    for name in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")] + ["transformer.ln_f.weight"]


def nanogpt_prepare(folder) -> None:
    """What data/shakespeare_char/prepare.py writes: train.bin and val.bin (the first 90% and the rest, as
    uint16 ids of the sorted characters) and meta.pkl with vocab_size, itos and stoi. No meta.json."""
    data = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:100_000]
    chars = sorted(set(data))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    n = len(data)
    folder.mkdir(parents=True)
    np.array([stoi[c] for c in data[:int(n * 0.9)]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)


def nanogpt_train(data_dir, out_dir) -> dict:
    """ITERS steps of nanoGPT's loop (its AdamW groups, its get_batch), saved as its train.py saves: the
    compiled model's state dict (`_orig_mod.` names), the optimizer's (by position), model_args, iter_num,
    best_val_loss and its config dict. Returns that checkpoint."""
    torch.manual_seed(1337)
    model = GPT(GPTConfig(**MODEL_ARGS))  # nanoGPT's parameter names
    params = dict(model.named_parameters())
    params = [params[name] for name in NANOGPT_PARAMETERS]  # in the order of nanoGPT's own model
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.99))
    data = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
    for _ in range(ITERS):
        ix = torch.randint(len(data) - 32, (16,))
        x = torch.stack([torch.from_numpy(data[i:i + 32].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 33].astype(np.int64)) for i in ix])
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    config = {"out_dir": "out-shakespeare-char", "dataset": "shakespeare_char", "batch_size": 16, "block_size": 32,
              "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "max_iters": 5000, "beta2": 0.99,
              "dropout": 0.2, "bias": False, "compile": True, "dtype": "float32", "device": "cpu"}
    checkpoint = {"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                  "optimizer": optimizer.state_dict(), "model_args": MODEL_ARGS, "iter_num": ITERS,
                  "best_val_loss": torch.tensor(2.9), "config": config}
    out_dir.mkdir()
    torch.save(checkpoint, out_dir / "ckpt.pt")
    return checkpoint


@pytest.fixture(scope="module")
def nanogpt_checkout(tmp_path_factory):
    """A nanoGPT checkout's working directory after prepare.py and train.py, and the checkpoint it saved."""
    root = tmp_path_factory.mktemp("nanogpt")
    nanogpt_prepare(root / "data" / "shakespeare_char")
    return root, nanogpt_train(root / "data" / "shakespeare_char", root / "out-shakespeare-char")


@pytest.fixture
def nanogpt(nanogpt_checkout, tmp_path, monkeypatch):
    """A copy of that checkout, which the test runs in; returns the checkpoint nanoGPT saved."""
    root, checkpoint = nanogpt_checkout
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return checkpoint


def gptrain_config(tmp_path, *overrides):
    return load_config([
        "data_dir=data/shakespeare_char", "out_dir=out-shakespeare-char", f"log_dir={tmp_path / 'logs'}",
        "n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "bias=false", "dropout=0.2", "batch_size=16",
        "tokens_per_step=null", "gradient_accumulation_steps=1", "learning_rate=1e-2", "beta2=0.99",
        "warmup_iters=0", "decay_lr=false", "eval_interval=5", "eval_iters=4", "device=cpu", "dtype=float32",
        "compile=false", "tensorboard=false", *overrides])


def test_sample_decodes_through_the_datasets_meta_pkl(nanogpt, capsys):
    generate(["--model_path", "out-shakespeare-char/ckpt.pt", "--prompt", "ROMEO:", "--max_new_tokens", "20",
              "--temperature", "0", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert "data/shakespeare_char/meta.pkl" in err
    # greedy, so it must be what the weights give, decoded with nanoGPT's itos
    with open("data/shakespeare_char/meta.pkl", "rb") as f:
        meta = pickle.load(f)
    model = GPT(GPTConfig(**{**MODEL_ARGS, "dropout": 0.0}))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in nanogpt["model"].items()})
    model.eval()
    ids = torch.tensor([[meta["stoi"][c] for c in "ROMEO:"]])
    for _ in range(20):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out == "".join(meta["itos"][i] for i in ids[0, 6:].tolist()) + "\n"  # the continuation


def test_resume_continues_its_weights_optimizer_and_iteration(nanogpt, tmp_path, capsys):
    run = build(gptrain_config(tmp_path, "init_from=resume", f"max_iters={ITERS + 10}"), DistInfo())
    run.logger.close()
    assert run.state.progress.step == ITERS and run.state.progress.best_val_loss == pytest.approx(2.9)
    assert "is nanoGPT's: its weights, AdamW state, iteration and best val loss go on, but not its data position " \
           "or random state" in capsys.readouterr().out
    # each parameter's AdamW moments are nanoGPT's, found by name though nanoGPT kept them by position
    saved = nanogpt["optimizer"]["state"]
    params = dict(run.model.named_parameters())
    by_position = [n for n in NANOGPT_PARAMETERS if params[n].dim() >= 2] + [
        n for n in NANOGPT_PARAMETERS if params[n].dim() < 2]
    for position, name in enumerate(by_position):
        state = run.optimizers[0].state[params[name]]
        assert torch.equal(state["exp_avg"], saved[position]["exp_avg"]), name
        assert torch.equal(state["exp_avg_sq"], saved[position]["exp_avg_sq"]), name
        assert float(state["step"]) == ITERS
        assert torch.equal(params[name].detach(), nanogpt["model"][f"_orig_mod.{name}"]), name

    history = train(gptrain_config(tmp_path, "init_from=resume", f"max_iters={ITERS + 10}"))
    steps = [r["step"] for r in history if "train/loss" in r]
    assert steps[0] == ITERS and steps[-1] == ITERS + 9
    assert history[0]["train/loss"] < 3.0  # nanoGPT's weights, not a fresh model's ln(65) = 4.17
    assert load_checkpoint("out-shakespeare-char/ckpt.pt").progress.step == ITERS + 10


def test_fine_tuning_starts_a_new_run_from_its_weights(nanogpt, tmp_path):
    shutil.copy("out-shakespeare-char/ckpt.pt", tmp_path / "nanogpt.pt")
    history = train(gptrain_config(tmp_path, f"init_from={tmp_path / 'nanogpt.pt'}", "out_dir=finetuned",
                                   "max_iters=6", "learning_rate=1e-3", "dropout=0.1"))
    val = {r["step"]: r["val/loss"] for r in history if "val/loss" in r}
    assert min(val) == 0 and val[0] < 3.0 < math.log(65)
    saved = load_checkpoint("finetuned/ckpt.pt")
    assert saved.progress.step == 6 and saved.model_config.dropout == 0.1
    assert saved.record.tokenizer["name"] == "char"  # from the meta.pkl, so generate needs no --meta from now on
