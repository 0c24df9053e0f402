import subprocess
import sys
from pathlib import Path

import pytest

from gptrain.config import DEFAULT_YAML, ConfigError, TrainConfig, default_yaml_text, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_is_generated_from_the_dataclass():
    assert DEFAULT_YAML.read_text() == default_yaml_text()


def test_defaults_are_gpt2_124m():
    c = load_config([])
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.bias) == (12, 12, 768, 1024, True)
    assert c.data_dir == "data/openwebtext" and c.out_dir == "checkpoints"


def test_layers_default_then_yaml_then_overrides(tmp_path):
    yaml = tmp_path / "small.yaml"
    yaml.write_text("n_layer: 3\nbatch_size: 7\nlearning_rate: 1\n")
    c = load_config([str(yaml), "n_layer=5", "compile=False", "dropout=0.1"])
    assert c.n_layer == 5  # the override beats the YAML
    assert c.batch_size == 7  # the YAML beats default.yaml
    assert c.learning_rate == 1.0 and isinstance(c.learning_rate, float)
    assert c.compile is False and c.dropout == 0.1
    assert c.n_embd == 768  # untouched keys keep the defaults
    assert isinstance(c, TrainConfig)


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'batch_szie' in command line \(did you mean 'batch_size'\?\)"):
        load_config(["batch_szie=3"])


def test_wrong_type_names_the_key_and_all_problems_come_at_once(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("n_layr: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config([str(yaml), "n_layer=abc", "compile=maybe"])
    message = str(e.value)
    assert "\n" not in message
    assert f"unknown key 'n_layr' in {yaml} (did you mean 'n_layer'?)" in message
    assert "n_layer must be int, got 'abc'" in message
    assert "compile must be bool, got 'maybe'" in message


def test_validation_catches_what_types_cannot():
    with pytest.raises(ConfigError, match=r"n_embd \(100\) must be divisible by n_head \(12\).*dtype must be"):
        load_config(["n_embd=100", "dtype=fp8"])


def test_missing_yaml_and_stray_argument():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config(["nope.yaml"])
    with pytest.raises(ConfigError, match="expected a .yaml file or key=value, got 'oops'"):
        load_config(["oops"])


def test_cli_reports_a_bad_key_in_one_line_without_traceback():
    result = subprocess.run([sys.executable, "train.py", "batch_szie=16"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown key 'batch_szie' in command line (did you mean 'batch_size'?)"
    ]


def test_settings_that_would_fail_later_are_caught_at_start_up():
    with pytest.raises(ConfigError) as e:
        load_config(["beta1=1.5", "init_from=resum", "backend=mpi", "vocab_size=abc"])
    assert str(e.value) == "vocab_size must be int or null, got 'abc' in command line"
    with pytest.raises(ConfigError) as e:
        load_config(["beta1=1.5", "init_from=resum", "backend=mpi"])
    assert str(e.value) == ("beta1 and beta2 must be in [0, 1) (got 1.5, 0.95); init_from must be scratch, resume "
                            "or the path of a checkpoint file (got 'resum'); backend must be nccl or gloo (got 'mpi')")
