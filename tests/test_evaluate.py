import json
import math
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from gptrain.checkpoint import RunRecord, save_checkpoint
from gptrain.config import GPTConfig
from gptrain.data import open_tokens, read_meta
from gptrain.evaluate import evaluate_tokens, main, perplexity, split_bits_per_byte
from gptrain.metrics import bits_per_byte
from gptrain.model import GPT
from gptrain.prepare import main as prepare

CPU = torch.device("cpu")


def random_model(vocab_size: int, block_size: int = 16) -> GPT:
    """Tiny, with large random weights, so that every position's loss differs and a token predicted
    twice, skipped, or from the wrong context would change the mean."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture
def checkpoint(char_data, tmp_path):
    """A checkpoint as training writes one for the char_data corpus: model, tokenizer, config with data_dir."""
    meta = read_meta(char_data)
    model = random_model(meta["vocab_size"])
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path.parent, model=model, record=RunRecord(config={"data_dir": str(char_data)}, tokenizer=meta["tokenizer"]))
    return path, model


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `gptrain eval ARGS`."""
    capsys.readouterr()
    try:
        main(["--device", "cpu", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def evaluated(capsys, path, *args: str) -> dict:
    code, out, err = run(capsys, "--model_path", str(path), "--json", *args)
    assert code == 0, err
    assert len(out.splitlines()) == 1
    return json.loads(out)


@torch.no_grad()
def reference_loss(model: GPT, tokens: np.ndarray, n: int) -> float:
    """Token by token: token t predicted from its window's tokens before it, with the model's last logits."""
    block_size, losses = model.config.block_size, []
    ids = torch.from_numpy(tokens[:n + 1].astype(np.int64))
    for t in range(1, n + 1):
        start = (t - 1) // block_size * block_size
        logits, _ = model(ids[start:t][None])
        losses.append(-torch.log_softmax(logits[0, -1].double(), -1)[ids[t]].item())
    return sum(losses) / n


def test_a_uniform_model_scores_ln_v_and_its_bits_per_byte_by_hand():
    model = random_model(64)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each of the 64 tokens has probability 1/64
    tokens = np.random.default_rng(0).integers(0, 64, 100).astype(np.uint16)
    loss, n = evaluate_tokens(model, tokens, block_size=16, batch_size=4, device=CPU, autocast=torch.autocast("cpu", enabled=False))
    assert n == 99 and loss == pytest.approx(math.log(64), abs=1e-6)
    assert perplexity(loss) == pytest.approx(64)
    # 6 bits per token; at 2 bytes per token, 3 bits per byte, whether the split is cut or whole
    assert bits_per_byte(math.log(64), 99, 198) == pytest.approx(3.0)
    assert split_bits_per_byte(math.log(64), 99, {"tokens": 100, "text_bytes": 200}) == pytest.approx(3.0)
    assert split_bits_per_byte(math.log(64), 10, {"tokens": 100, "text_bytes": 200}) == pytest.approx(3.0)
    assert split_bits_per_byte(math.log(64), 99, {"tokens": 100}) is None


def test_eval_equals_the_token_by_token_loss_for_any_batch_size(capsys, checkpoint, char_data):
    path, model = checkpoint
    val = np.fromfile(char_data / "val.bin", dtype=np.uint16)
    expected = reference_loss(model, val, 40)  # windows of 16, 16 and a short 8
    for batch_size in ("1", "3"):
        result = evaluated(capsys, path, "--max_tokens", "40", "--batch_size", batch_size)
        assert result["tokens"] == 40
        assert result["loss"] == pytest.approx(expected, abs=1e-5)


def test_the_whole_split_in_order_with_every_field(capsys, checkpoint, char_data):
    path, model = checkpoint
    meta = read_meta(char_data)
    whole = evaluated(capsys, path)  # data_dir from the checkpoint, split val, batch 16
    assert whole["tokens"] == meta["val"]["tokens"] - 1  # every token but the first, once
    assert whole["split"] == "val" and whole["data_dir"] == str(char_data) and whole["model_path"] == str(path)
    assert whole["perplexity"] == pytest.approx(math.exp(whole["loss"]))
    # char-level: the bytes are the split's own, so bits per byte is loss over ln 2, per byte of the split
    expected_bpb = whole["loss"] * meta["val"]["tokens"] / (math.log(2) * meta["val"]["text_bytes"])
    assert whole["bits_per_byte"] == pytest.approx(expected_bpb)
    val = np.fromfile(char_data / "val.bin", dtype=np.uint16)
    loss, n = evaluate_tokens(model, val, block_size=16, batch_size=3, device=CPU,
                              autocast=torch.autocast("cpu", enabled=False))
    assert n == whole["tokens"] and loss == pytest.approx(whole["loss"], abs=1e-5)
    train = evaluated(capsys, path, "--split", "train", "--max_tokens", "100")
    assert train["tokens"] == 100 and train["split"] == "train" and train["loss"] != whole["loss"]


def test_text_output_is_one_line(capsys, checkpoint):
    path, _ = checkpoint
    code, out, err = run(capsys, "--model_path", str(path), "--max_tokens", "1000")
    assert code == 0 and err == ""
    line, = out.splitlines()
    split, tokens, loss, ppl, bpb = line.split(" | ")[0].split(": ") + line.split(" | ")[1:]
    assert (split, tokens) == ("val", "1,000 tokens")
    assert loss.startswith("loss ") and ppl.startswith("perplexity ") and bpb.endswith(" bits per byte")


def test_data_without_text_bytes_has_no_bits_per_byte(capsys, checkpoint, char_data, tmp_path):
    nano = tmp_path / "nano"
    nano.mkdir()
    shutil.copy(char_data / "val.bin", nano / "val.bin")
    meta = read_meta(char_data)
    meta["val"] = {"tokens": meta["val"]["tokens"]}
    (nano / "meta.json").write_text(json.dumps(meta))
    code, out, err = run(capsys, "--model_path", str(checkpoint[0]), "--data_dir", str(nano), "--json",
                         "--max_tokens", "50")
    assert code == 0 and json.loads(out)["bits_per_byte"] is None
    assert "no text_bytes" in err and err.count("\n") == 1


def test_data_with_another_tokenizer_is_refused_in_one_line(capsys, checkpoint, tmp_path):
    corpus = tmp_path / "other.txt"
    corpus.write_text("to be or not to be\n" * 50)
    prepare(["--input", str(corpus), "--tokenizer", "char", "--out_dir", str(tmp_path / "other"), "--num_proc", "1"])
    code, out, err = run(capsys, "--model_path", str(checkpoint[0]), "--data_dir", str(tmp_path / "other"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'other'} was tokenized with 'char' (") and "the checkpoint was trained" in err


def test_missing_checkpoint_data_and_split_are_one_line_errors(capsys, checkpoint, tmp_path):
    code, _, err = run(capsys, "--model_path", str(tmp_path / "missing.pt"))
    assert code == 2 and err == f"error: checkpoint not found: {tmp_path / 'missing.pt'}\n"
    code, _, err = run(capsys, "--model_path", str(checkpoint[0]), "--data_dir", str(tmp_path / "nothing"))
    assert code == 2 and err.startswith(f"error: no meta.json in {tmp_path / 'nothing'}") and err.count("\n") == 1
    code, _, err = run(capsys, "--model_path", str(checkpoint[0]), "--max_tokens", "0")
    assert code == 2 and err == "error: --batch_size and --max_tokens must be >= 1\n"


def mapped_bytes(path) -> int:
    """Bytes of `path` resident in this process through its mappings of it (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header, which ends with the file's path
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads Linux's /proc")
def test_a_whole_split_is_read_without_mapping_its_pages_into_the_process(char_data):
    """With pread, as training reads its windows: RSS stays flat however large the split (OpenWebText's
    train.bin is 17 GB), where reading through the memmap would keep every page it touched."""
    meta = read_meta(char_data)
    tokens = open_tokens(char_data, "train", meta)
    model = random_model(meta["vocab_size"], block_size=64)
    _, count = evaluate_tokens(model, tokens, block_size=64, batch_size=32, device=torch.device("cpu"),
                               autocast=nullcontext(), max_tokens=100_000)
    assert count == 100_000 and mapped_bytes(Path(tokens.filename).resolve()) == 0
    np.asarray(tokens[:100_000]).sum()  # what reading through the memmap would have done
    assert mapped_bytes(Path(tokens.filename).resolve()) > 0
