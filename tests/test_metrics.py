import json

import pytest
import torch

from gptrain.config import GPTConfig, TrainConfig
from gptrain.distributed import DistInfo
from gptrain.metrics import (
    ETA_S, EVAL_TRAIN_LOSS, GRAD_NORM, LINE, LR, METRICS, MFU, MS_PER_ITER, OVERFLOW_STEPS, PLOT_PANELS, POINTS, SAMPLE,
    SKIPPED_STEPS, SMOOTHED, STEP, TOKENS, TOKENS_PER_SEC, TRAIN_LOSS, VAL_BPB, VAL_LOSS, MetricsLogger, format_record,
    peak_flops,
)
from gptrain.model import GPT


def test_gpt2_small_flops_per_token():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304))
    n = model.num_params()  # every weight once, the tied embedding as the output projection; no wpe
    assert n == 124_475_904 - 1024 * 768
    assert model.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024


def test_peak_flops_comes_from_the_config_or_is_unknown_on_a_cpu():
    cpu = torch.device("cpu")
    assert peak_flops(TrainConfig(), cpu, torch.float32) is None
    assert peak_flops(TrainConfig(peak_tflops=100.0), cpu, torch.bfloat16) == 100e12


def test_console_line_shows_what_the_record_has():
    line = format_record({"step": 10, "train/loss": 2.5, "lr": 1e-3, "tokens_per_sec": 12345.6, "mfu": 0.3712})
    assert line == "iter 10 | loss 2.5000 | lr 1.00e-03 | 12,346 tok/s | mfu 37.1%"


def test_jsonl_writes_null_for_non_finite_values(tmp_path):
    logger = MetricsLogger(TrainConfig(out_dir=str(tmp_path), tensorboard=False), DistInfo())
    logger.log({"step": 3, "train/loss": 2.0, "grad_norm": float("inf")})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "train/loss": 2.0, "grad_norm": None}


def test_other_ranks_write_nothing(tmp_path):
    config = TrainConfig(out_dir=str(tmp_path / "out"), log_dir=str(tmp_path / "logs"))
    logger = MetricsLogger(config, DistInfo(rank=1, world_size=2))
    logger.log({"step": 0, "train/loss": 1.0})
    logger.close()
    assert not (tmp_path / "logs").exists() and not (tmp_path / "out").exists() and not logger.history


@pytest.mark.parametrize("name, expected", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                            ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_gpu_names_match_their_own_peak(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(TrainConfig(), torch.device("cuda"), torch.bfloat16) == expected * 1e12
    assert peak_flops(TrainConfig(), torch.device("cuda"), torch.float32) == expected * 1e12 / 2


def test_the_console_line_follows_the_table_for_a_full_record():
    record = {STEP: 10, TOKENS: 5120, TRAIN_LOSS: 2.5, VAL_LOSS: 2.6, EVAL_TRAIN_LOSS: 2.4, LR: 1e-3, GRAD_NORM: 0.5,
              MS_PER_ITER: 123.44, TOKENS_PER_SEC: 12345.6, MFU: 0.3712, ETA_S: 3671, VAL_BPB: 1.2, SKIPPED_STEPS: 0,
              OVERFLOW_STEPS: 1, SAMPLE: "ROMEO:\nWhat say'st thou?"}
    assert format_record(dict(reversed(record.items()))) == (  # the table's order, not the record's
        "iter 10 | loss 2.5000 | val loss 2.6000 | train loss 2.4000 | lr 1.00e-03 | grad norm 0.50 | 123.4 ms/iter "
        "| 12,346 tok/s | mfu 37.1% | eta 1h01m\nROMEO:\nWhat say'st thou?")


def test_every_sink_names_a_metric_by_its_key(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(out_dir=str(tmp_path / "out"), log_dir=str(tmp_path / "logs"), run_name="run")
    logger = MetricsLogger(config, DistInfo())
    logger.log({STEP: 0, TOKENS: 0, VAL_LOSS: 4.2, VAL_BPB: 1.5, SAMPLE: "hello"})
    logger.log({STEP: 1, TOKENS: 512, TRAIN_LOSS: 4.0, LR: 1e-3, MFU: None, SKIPPED_STEPS: 0})
    logger.close()
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [sorted(json.loads(line)) for line in lines] == [
        ["sample", "step", "tokens", "val/bpb", "val/loss"], ["lr", "mfu", "skipped_steps", "step", "tokens",
                                                              "train/loss"]]
    events = EventAccumulator(str(tmp_path / "logs" / "run"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["lr", "skipped_steps", "tokens", "train/loss", "val/bpb", "val/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 4.0)]
    assert any(tag.startswith("sample") for tag in events.Tags()["tensors"])  # text, as add_text stores it


def test_the_table_is_whole():
    """Keys unique, every plotted metric in a panel the plot draws, every stand-in standing in for a metric."""
    assert len(set(METRICS)) == len(METRICS) and all(isinstance(m, str) for m in METRICS)
    assert {m.panel for m in METRICS} - {None} == set(PLOT_PANELS)
    assert all(m.style in (SMOOTHED, LINE, POINTS) and m.unless in (None, *METRICS) for m in METRICS)


def test_every_key_training_logs_is_in_the_table(tiny_config):
    from gptrain.train import train

    history = train(tiny_config("max_iters=6", "lr_decay_iters=6", "eval_interval=3", "sample_interval=3"))
    logged = {key for record in history for key in record}
    assert SAMPLE in logged and VAL_BPB in logged and logged <= set(METRICS)
