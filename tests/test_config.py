import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gptrain.config import (
    DEFAULT_YAML, FIELDS, ConfigError, TrainConfig, default_yaml_text, help_text, load_config, plan_batch, plan_horizon,
    record_yaml,
)

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_configs_load_and_validate():
    quick_start = load_config([str(ROOT / "config" / "shakespeare_char.yaml")])
    assert (quick_start.n_layer, quick_start.max_iters, quick_start.batch_size) == (3, 1600, 12)
    modern = load_config([str(ROOT / "config" / "modern_shakespeare_char.yaml")])
    assert (modern.pos_emb, modern.optimizer, modern.lr_schedule, modern.max_iters) == ("rope", "muon", "wsd", 500)
    gpu = load_config([str(ROOT / "config" / "modern_124m.yaml")])
    assert (gpu.n_layer, gpu.n_embd, gpu.tie_embeddings, gpu.optimizer) == (12, 768, False, "muon")


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
        load_config([str(yaml), "n_layer=abc", "bias=maybe"])
    message = str(e.value)
    assert "\n" not in message
    assert f"unknown key 'n_layr' in {yaml} (did you mean 'n_layer'?)" in message
    assert "n_layer must be int, got 'abc'" in message
    assert "bias must be bool, got 'maybe'" in message


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
    assert str(e.value) == ("backend must be one of nccl, gloo (got 'mpi'); beta1 and beta2 must be in [0, 1) "
                            "(got 1.5, 0.95); init_from must be scratch, resume, the path of a checkpoint file, one of "
                            "gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 directory (got 'resum')")


def test_tokens_per_step_fixes_the_step_whatever_the_world_size():
    config = load_config(["tokens_per_step=1536", "batch_size=24", "block_size=64"])
    plans = {w: plan_batch(config, 64, w, 24) for w in (1, 2, 3, 8)}
    for world_size, plan in plans.items():
        assert plan.batch_size * 64 * plan.gradient_accumulation_steps == 1536
        assert plan.gradient_accumulation_steps % world_size == 0
    assert [(p.batch_size, p.gradient_accumulation_steps) for p in plans.values()] == [(24, 1), (12, 2), (8, 3), (3, 8)]


@pytest.mark.parametrize("tokens, world_size, message", [
    (1000, 1, "tokens_per_step (1,000) must be a multiple of block_size (64)"),
    (1536, 5, "tokens_per_step (1,536) is 24 sequences of 64 tokens, which 5 processes cannot share evenly"),
])
def test_a_step_that_cannot_be_made_up_is_one_line(tokens, world_size, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_batch(load_config([f"tokens_per_step={tokens}"]), 64, world_size, 24)


def test_max_iters_auto_trains_tokens_per_param_tokens_per_parameter():
    config = load_config(["max_iters=auto", "tokens_per_param=20", "tokens_per_step=1000", "warmup_iters=10"])
    plan = plan_horizon(config, num_params=1_234_567)
    assert plan.max_iters == 24692  # ceil(20 x 1,234,567 / 1,000)
    assert plan.max_iters * 1000 >= 20 * 1_234_567 > (plan.max_iters - 1) * 1000
    assert plan.lr_decay_iters == plan.max_iters  # follows max_iters unless set
    assert plan_horizon(replace(config, lr_decay_iters=500), 1_234_567).lr_decay_iters == 500


@pytest.mark.parametrize("args, message", [
    (["tokens_per_step=1024", "gradient_accumulation_steps=4"], "set one of tokens_per_step and gradient_accumulation_steps"),
    (["tokens_per_step=null", "gradient_accumulation_steps=4", "batch_size=auto"], "need tokens_per_step"),
    (["batch_size=lots"], "batch_size must be a number or auto (got 'lots')"),
    (["compile=sometimes"], "compile must be true, false or auto (got 'sometimes')"),
])
def test_batch_and_horizon_settings_are_checked_at_start_up(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(args)


def test_the_run_record_loads_back_into_the_same_config(tmp_path):
    config = plan_batch(load_config(["tokens_per_step=2048", "batch_size=16", "block_size=64", "n_layer=3"]), 64, 2, 16)
    (tmp_path / "config.yaml").write_text(record_yaml(config))
    assert load_config([str(tmp_path / "config.yaml")]) == replace(config, gradient_accumulation_steps=None)


def test_recipe_switches_default_to_gpt2_and_bad_choices_are_one_line():
    config = load_config([])
    assert (config.pos_emb, config.norm, config.qk_norm, config.mlp, config.tie_embeddings, config.logit_softcap,
            config.zero_init_proj, config.optimizer, config.lr_schedule) == (
        "learned", "layernorm", False, "gelu", True, None, False, "adamw", "cosine")
    assert load_config(["logit_softcap=15"]).logit_softcap == 15.0  # an int widened to the float it stands for
    with pytest.raises(ConfigError) as e:
        load_config(["pos_emb=alibi", "mlp=geglu", "optimizer=sgd", "decay_fraction=0", "n_embd=36", "n_head=4",
                     "pos_emb=rope", "logit_softcap=-1"])
    assert str(e.value) == (
        "mlp must be one of gelu, relu2, swiglu (got 'geglu'); optimizer must be one of adamw, muon (got 'sgd'); "
        "logit_softcap must be > 0 or null (got -1.0); pos_emb=rope needs an even head size (n_embd / n_head = 9); "
        "decay_fraction must be in (0, 1] (got 0.0)")


CHOICE_SETTINGS = [name for name, f in FIELDS.items() if f.metadata["choices"]]


@pytest.mark.parametrize("name", CHOICE_SETTINGS)
def test_a_settings_choices_are_what_validation_help_and_default_yaml_know(name):
    choices = FIELDS[name].metadata["choices"]
    for value in choices:
        assert getattr(load_config([f"{name}={value}"]), name) == value
    with pytest.raises(ConfigError, match=rf"^{name} must be .*{' or ' if len(choices) == 1 else ', '.join(choices)}"
                                          r".* \(got 'bogus'\)$"):
        load_config([f"{name}=bogus"])
    row = next(line for line in help_text().splitlines() if line.split()[0] == name)
    comment = next(line for line in default_yaml_text().splitlines() if line.startswith(f"{name}:")).split("# ")[1]
    for value, meaning in choices.items():
        listed = f"{value} ({meaning})" if meaning else value
        assert listed in row and listed in comment


@pytest.mark.parametrize("arg, message", [
    ("batch_size=[1, 2]", "batch_size must be int or auto, got [1, 2]"),
    ("compile=[1]", "compile must be bool or auto, got [1]"),
    ("logit_softcap=abc", "logit_softcap must be float or null, got 'abc'"),
])
def test_a_type_error_names_the_type_as_declared(arg, message):
    with pytest.raises(ConfigError, match=re.escape(message + " in command line")):
        load_config([arg])


@pytest.mark.parametrize("yaml_text, args, kept, dropped, note", [
    ("tokens_per_step: 768\n", ["gradient_accumulation_steps=2"], ("gradient_accumulation_steps", 2),
     "tokens_per_step", "note: tokens_per_step=768 ({yaml}) dropped for gradient_accumulation_steps=2 (command line)"),
    ("gradient_accumulation_steps: 4\n", ["tokens_per_step=1024"], ("tokens_per_step", 1024),
     "gradient_accumulation_steps", "note: gradient_accumulation_steps=4 ({yaml}) dropped for tokens_per_step=1024 "
                                    "(command line)"),
    ("gradient_accumulation_steps: 4\n", [], ("gradient_accumulation_steps", 4), "tokens_per_step", ""),  # default.yaml's
])
def test_a_later_layer_setting_one_of_a_pair_drops_the_other(tmp_path, capsys, yaml_text, args, kept, dropped, note):
    (tmp_path / "run.yaml").write_text(yaml_text + "block_size: 64\n")
    config = load_config([str(tmp_path / "run.yaml"), *args])
    assert getattr(config, kept[0]) == kept[1] and getattr(config, dropped) is None
    expected = note.format(yaml=tmp_path / "run.yaml")
    assert capsys.readouterr().err == (expected + "; a run sets one of the two\n" if note else "")


def test_a_pair_set_in_one_layer_stays_an_error_and_only_rank_0_notes(tmp_path, capsys, monkeypatch):
    (tmp_path / "both.yaml").write_text("tokens_per_step: 1024\ngradient_accumulation_steps: 4\n")
    with pytest.raises(ConfigError, match="set one of tokens_per_step and gradient_accumulation_steps"):
        load_config([str(tmp_path / "both.yaml")])
    monkeypatch.setenv("RANK", "1")
    config = load_config([str(ROOT / "config" / "shakespeare_char.yaml"), "gradient_accumulation_steps=2"])
    assert config.gradient_accumulation_steps == 2 and capsys.readouterr().err == ""


def test_the_command_lines_accumulation_trains_over_a_yamls_tokens_per_step(char_data, tmp_path):
    args = ["config/shakespeare_char.yaml", "gradient_accumulation_steps=2", f"data_dir={char_data}",
            f"out_dir={tmp_path / 'out'}", "max_iters=2", "lr_decay_iters=2", "warmup_iters=0", "eval_iters=1",
            "device=cpu", "compile=false", "tensorboard=false"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ("note: tokens_per_step=768 (config/shakespeare_char.yaml) dropped for gradient_accumulation_steps=2 "
            "(command line); a run sets one of the two") in result.stderr.splitlines()
    assert (tmp_path / "out" / "ckpt.pt").is_file()


@pytest.mark.parametrize("name, advice", [
    ("train_shakespeare_char.py", "use config/shakespeare_char.yaml"),
    ("finetune_shakespeare.py", "use config/finetune_shakespeare.yaml"),
    ("train_gpt2.py", "gptrain's default (config/default.yaml)"),
    ("eval_gpt2_medium.py", "use init_from=gpt2-medium eval_only=true"),
    ("my_sweep.py", "write its settings as `key: value` lines in a .yaml file"),
])
def test_a_nanogpt_config_file_is_refused_by_name_with_its_yaml(name, advice):
    with pytest.raises(ConfigError) as e:
        load_config([f"config/{name}", "n_layer=2"])
    assert str(e.value).startswith(f"config/{name} is a Python config file as nanoGPT's configurator runs them")
    assert advice in str(e.value) and "\n" not in str(e.value)
