import json

import pytest
import torch

from gptrain.config import GPTConfig, TrainConfig
from gptrain.distributed import DistInfo
from gptrain.metrics import MetricsLogger, format_record, peak_flops
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
