import math
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptrain.checkpoint import CheckpointError, load_checkpoint
from gptrain.config import load_config
from gptrain.data import DataError
from gptrain.model import GPT
from gptrain.prepare import main as prepare
from gptrain.distributed import DistInfo
from gptrain.optim import set_lr
from gptrain.train import TrainingError, build, find_batch_size, padded_vocab, train
from gptrain.train import main as train_main


def losses(history: list[dict], key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in history if key in r}


# every switch of the modern recipe on at once, Muon and the WSD schedule included
MODERN = ("pos_emb=rope", "norm=rmsnorm", "qk_norm=true", "mlp=swiglu", "tie_embeddings=false", "logit_softcap=15",
          "zero_init_proj=true", "optimizer=muon", "lr_schedule=wsd")


@pytest.mark.parametrize("recipe", [(), ("optimizer=muon",), MODERN], ids=["gpt2", "muon", "modern"])
def test_loss_falls(tiny_config, recipe):
    history = train(tiny_config("max_iters=300", "lr_decay_iters=300", "eval_interval=300", "learning_rate=1e-2",
                                "log_interval=50", *recipe))
    val = losses(history, "val/loss")
    assert val[0] > 4.0  # about ln(65): a uniform guess over the characters
    assert val[300] < 3.1  # below the 3.31 nats that character frequencies alone give


@pytest.mark.parametrize("recipe", [(), MODERN], ids=["gpt2", "modern"])
def test_resumed_run_matches_the_uninterrupted_run(tiny_config, tmp_path, recipe):
    # dropout and 2 micro-batches exercise the RNG and the data position, not only the weights
    common = ("dropout=0.1", "gradient_accumulation_steps=2", "max_iters=8", "lr_decay_iters=8", "eval_interval=4",
              *recipe)
    whole = train(tiny_config(*common, f"out_dir={tmp_path / 'whole'}"))
    train(tiny_config(*common, "max_iters=4", f"out_dir={tmp_path / 'split'}"))  # stops (as if killed) at iter 4
    resumed = train(tiny_config(*common, "init_from=resume", f"out_dir={tmp_path / 'split'}"))

    assert losses(resumed) == {s: v for s, v in losses(whole).items() if s >= 4}
    assert losses(resumed, "val/loss") == {8: losses(whole, "val/loss")[8]}
    a, b = (load_checkpoint(tmp_path / run / "ckpt.pt") for run in ("whole", "split"))
    assert a.progress.step == b.progress.step == 8
    for name, tensor in a.tensors["model"].items():
        assert torch.equal(tensor, b.tensors["model"][name]), name


def test_a_resumed_run_takes_the_learning_rates_it_is_given(tiny_config, tmp_path):
    """Each group's peak comes from the config at every step, not from the optimizer state saved."""
    train(tiny_config("optimizer=muon", "max_iters=4", "decay_lr=false", "warmup_iters=0"))
    history = train(tiny_config("optimizer=muon", "max_iters=6", "decay_lr=false", "warmup_iters=0", "init_from=resume",
                                "learning_rate=1e-3", "muon_lr=5e-3"))
    assert losses(history, "lr") == {4: 1e-3, 5: 1e-3}
    run = build(tiny_config("optimizer=muon", "init_from=resume", "learning_rate=1e-3", "muon_lr=5e-3"), DistInfo())
    set_lr(run.optimizers, run.config, 1.0)
    adamw, muon = run.optimizers
    assert {g["lr"] for g in adamw.param_groups} == {1e-3} and [g["lr"] for g in muon.param_groups] == [5e-3]
    run.logger.close()


def test_resuming_with_another_optimizer_is_a_one_line_error(tiny_config):
    train(tiny_config("max_iters=4"))
    with pytest.raises(CheckpointError, match="was trained with optimizer=adamw; resume with it, or fine-tune from "
                                              "its weights with init_from=.*ckpt-000004.pt instead of resuming"):
        train(tiny_config("optimizer=muon", "init_from=resume"))


def test_fine_tuning_starts_from_the_checkpoint_weights(tiny_config, tmp_path, capsys):
    pretrained = train(tiny_config(f"out_dir={tmp_path / 'pre'}"))
    # n_layer and n_embd at their defaults (12, 768) take the checkpoint's (2, 32)
    finetuned = train(tiny_config(f"init_from={tmp_path / 'pre' / 'ckpt.pt'}", "max_iters=2", "eval_interval=2",
                                  "n_layer=12", "n_embd=768", f"out_dir={tmp_path / 'ft'}"))
    assert "note: the model keeps the checkpoint's n_layer=2, n_embd=32 " in capsys.readouterr().out
    assert finetuned[0]["step"] == 0
    assert losses(finetuned, "val/loss")[0] == pytest.approx(losses(pretrained, "val/loss")[20], abs=1e-6)
    assert load_checkpoint(tmp_path / "ft" / "ckpt.pt").model_config.n_layer == 2


@pytest.mark.parametrize("init_from", ["checkpoint", "resume"])
def test_a_shape_the_checkpoint_fixes_cannot_change(tiny_config, tiny_args, tmp_path, capsys, init_from):
    train(tiny_config("max_iters=2"))
    source = f"init_from={tmp_path / 'out' / 'ckpt.pt'}" if init_from == "checkpoint" else "init_from=resume"
    with pytest.raises(SystemExit) as stop:
        train_main(tiny_args(source, "n_layer=5", "mlp=swiglu", f"out_dir={tmp_path / 'ft'}"
                                    if init_from == "checkpoint" else "max_iters=4"))
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ")
    assert "has n_layer=2, mlp=gelu, which a" in error and "but the config sets n_layer=5, mlp=swiglu" in error
    assert not (tmp_path / "ft").exists()


def test_every_log_step_lands_in_metrics_jsonl_and_tensorboard(tiny_config, tmp_path):
    history = train(tiny_config("max_iters=4", "tensorboard=true", "log_interval=2", "eval_interval=2"))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records == history
    assert [r["step"] for r in records if "train/loss" in r] == [0, 2]
    assert records[-2]["step"] == 2 and records[-2]["tokens_per_sec"] > 0 and records[-2]["ms_per_iter"] > 0
    assert [r["tokens"] for r in records if "train/loss" in r] == [0, 512]  # seen before the step: 8 x 32 a step
    # char data: a byte per token, so bits per byte is the loss in bits
    assert all(r["val/bpb"] == pytest.approx(r["val/loss"] / math.log(2)) for r in records if "val/loss" in r)
    events = EventAccumulator(str(tmp_path / "logs" / "out"))  # log_dir / the run's name (out_dir's)
    events.Reload()
    for tag in ("train/loss", "val/loss", "val/bpb", "lr", "grad_norm", "tokens"):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [
            (r["step"], pytest.approx(r[tag])) for r in records if tag in r], tag


def test_a_resumed_run_logs_each_step_once(tiny_config, tmp_path):
    """The first run goes on past its last checkpoint (iter 4) to iter 6, as if killed there; the resumed run
    drops what was logged after iter 4 from metrics.jsonl and TensorBoard and logs it again, once."""
    common = ("tensorboard=true", "eval_interval=4", "always_save_checkpoint=true")
    train(tiny_config(*common, "max_iters=8"))
    checkpoint = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    (tmp_path / "out" / "ckpt.pt").unlink()
    train(tiny_config(*common, "max_iters=4", f"out_dir={tmp_path / 'four'}"))  # a checkpoint at iter 4
    (tmp_path / "four" / "ckpt.pt").rename(tmp_path / "out" / "ckpt.pt")
    assert checkpoint.progress.step == 8 and load_checkpoint(tmp_path / "out" / "ckpt.pt").progress.step == 4
    train(tiny_config(*common, "max_iters=8", "init_from=resume"))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/loss", "val/loss"):
        steps = [r["step"] for r in records if key in r]
        assert steps == sorted(set(steps)), key
    assert [r["step"] for r in records if "train/loss" in r] == list(range(8))
    assert [r["step"] for r in records if "val/loss" in r] == [0, 4, 8]
    events = EventAccumulator(str(tmp_path / "logs" / "out"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(8))
    assert [e.step for e in events.Scalars("val/loss")] == [0, 4, 8]


def test_wandb_offline_run_writes_its_run_directory_and_resumes_it(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_config("wandb_log=true", "max_iters=4", "eval_interval=4"))
    run_id = load_checkpoint(tmp_path / "out" / "ckpt.pt").record.wandb_id
    [log] = (tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    written = log.read_bytes()  # protobuf records, which `wandb sync` uploads; the keys are there as text
    assert all(key.encode() in written for key in ("train/loss", "val/loss", "val/bpb", "lr", "grad_norm", "tokens"))
    train(tiny_config("wandb_log=true", "max_iters=6", "eval_interval=4", "init_from=resume"))
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt").record.wandb_id == run_id  # the same W&B run, continued


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains(tiny_config, dtype):
    history = train(tiny_config(f"dtype={dtype}", "max_iters=10", "eval_interval=10"))
    val = losses(history, "val/loss")
    assert val[10] < val[0]


def test_divergence_stops_with_a_clear_error(tiny_config):
    """A learning rate of 1e6 turns the weights to NaN at the first step; every step after is bad, and
    max_bad_steps of them in a row stop the run."""
    with pytest.raises(TrainingError, match=r"stayed non-finite for 3 steps in a row \(loss nan, .*max_bad_steps=3\) "
                                            r"at iter 3 .*lower learning_rate"):
        train(tiny_config("learning_rate=1e6", "min_lr=0", "warmup_iters=0", "grad_clip=0", "max_iters=50",
                          "max_bad_steps=3"))


def nan_at(monkeypatch, steps: set[int]) -> None:
    """Make the training loss NaN at these steps (one forward in training mode a step: no accumulation)."""
    forward, calls = GPT.forward, iter(range(10**6))

    def poisoned(self, idx, targets=None, **kwargs):
        logits, loss = forward(self, idx, targets, **kwargs)
        if self.training and next(calls) in steps:
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)


def test_a_nan_step_is_skipped_and_counted_and_training_goes_on(tiny_config, tmp_path, monkeypatch):
    nan_at(monkeypatch, {7})
    history = train(tiny_config("keep_last_n=5"))
    train_records = {r["step"]: r for r in history if "train/loss" in r}
    assert math.isnan(train_records[7]["train/loss"]) and train_records[7]["skipped_steps"] == 1
    assert train_records[19]["skipped_steps"] == 1 and math.isfinite(train_records[19]["train/loss"])
    val = losses(history, "val/loss")
    assert val[20] < val[0]
    for step in (10, 20):
        saved = load_checkpoint(tmp_path / "out" / f"ckpt-{step:06d}.pt")
        assert all(torch.isfinite(t).all() for t in saved.tensors["model"].values())
        # the skipped step left the optimizer state alone: AdamW counted one update fewer than steps
        assert {float(s["step"]) for s in saved.tensors["optimizer"]["state"].values()} == {step - 1}


def test_float16_overflows_are_counted_apart_and_never_stop_the_run(tiny_config, monkeypatch):
    """With float16's gradient scaler a non-finite gradient is an overflow: the scaler skips the step and
    lowers its scale, as it does many times while it finds one, so these are not bad steps."""
    nan_at(monkeypatch, set(range(3, 9)))
    history = train(tiny_config("dtype=float16", "max_bad_steps=2", "max_iters=12", "eval_interval=12"))
    last = [r for r in history if "train/loss" in r][-1]
    assert last["overflow_steps"] == 6 and last["skipped_steps"] == 0
    assert math.isfinite(last["train/loss"])


def test_max_bad_steps_in_a_row_stop_the_run(tiny_args, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, {3, 4, 5, 6})
    with pytest.raises(SystemExit) as stop:
        train_main(tiny_args("max_bad_steps=4", "eval_interval=2"))
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1  # a failure at run time, not bad input: one line
    assert err.startswith("error: the loss or its gradient stayed non-finite for 4 steps in a row (loss nan, ")
    assert err.endswith("max_bad_steps=4) at iter 6 (lr 2.97e-03); the checkpoints are left untouched. Try a lower "
                        "learning_rate, grad_clip > 0, a longer warmup_iters, or dtype=bfloat16 instead of float16\n")
    # steps 3, 4 and 5 were skipped, so the checkpoints of iter 4 and 6 hold the weights step 2 left
    at_4, at_6 = (load_checkpoint(tmp_path / "out" / f"ckpt-{step:06d}.pt") for step in (4, 6))
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt").progress.step == 6
    for name, tensor in at_6.tensors["model"].items():
        assert torch.isfinite(tensor).all() and torch.equal(tensor, at_4.tensors["model"][name]), name


def test_fine_tuning_on_data_with_another_tokenizer_is_refused(tiny_config, tmp_path):
    train(tiny_config("max_iters=1", "eval_interval=1", f"out_dir={tmp_path / 'pre'}"))
    other = tmp_path / "other"
    other.mkdir()
    text = tmp_path / "abc.txt"
    text.write_text("abcabcabc" * 200)
    prepare(["--input", str(text), "--tokenizer", "char", "--out_dir", str(other)])
    with pytest.raises(DataError, match="tokenized with 'char' but the checkpoint with a different 'char' tokenizer"):
        train(tiny_config(f"init_from={tmp_path / 'pre' / 'ckpt.pt'}", f"data_dir={other}"))


def test_resume_with_float16_from_a_float32_run(tiny_config, tmp_path):
    train(tiny_config("max_iters=4", "eval_interval=4"))
    history = train(tiny_config("init_from=resume", "dtype=float16", "max_iters=6", "eval_interval=6"))
    assert [r["step"] for r in history if "train/loss" in r] == [4, 5]


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tiny_config, capsys):
    train(tiny_config("max_iters=4", "eval_interval=4"))
    assert train(tiny_config("init_from=resume", "max_iters=4")) == []
    assert "the checkpoint is at iter 4, max_iters is 4: nothing to train" in capsys.readouterr().out


def test_a_failing_torch_compile_falls_back_to_eager_and_trains(tiny_config, monkeypatch, capsys):
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=no_compiler))
    history = train(tiny_config("compile=true", "max_iters=10", "eval_interval=10"))
    out = capsys.readouterr().out
    assert out.count("warning: torch.compile failed") == 1 and "no C++ compiler found" in out
    val = losses(history, "val/loss")
    assert val[10] < val[0]


def test_the_run_record_is_written_and_kept_in_checkpoints(tiny_config, tmp_path):
    config = tiny_config("max_iters=auto", "tokens_per_step=512", "gradient_accumulation_steps=null",
                         "tokens_per_param=0.5", "eval_interval=1000")
    history = train(config)
    params = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    steps = -(-round(0.5 * GPT(params.model_config).num_params()) // 512)
    assert max(losses(history)) == steps - 1  # max_iters=auto: tokens_per_param tokens per parameter
    recorded = load_config([str(tmp_path / "out" / "config.yaml")])
    assert (recorded.max_iters, recorded.tokens_per_step, recorded.batch_size) == (steps, 512, 8)
    environment = json.loads((tmp_path / "out" / "environment.json").read_text())
    assert environment["torch"] == torch.__version__ and environment["world_size"] == 1
    assert params.record.environment == environment and params.record.config["max_iters"] == steps


def test_batch_size_auto_runs_trial_steps_and_keeps_tokens_per_step(tiny_config, capsys):
    # on the CPU nothing runs out of memory: the largest divisor of the step's 16 sequences up to 12
    history = train(tiny_config("batch_size=auto", "tokens_per_step=512", "gradient_accumulation_steps=null",
                                "max_iters=2", "eval_interval=2"))
    assert "512 tokens per step = 2 micro-batches of 8 x 32" in capsys.readouterr().out
    assert losses(history, "val/loss")[2] < losses(history, "val/loss")[0]


def test_batch_size_auto_takes_the_largest_micro_batch_that_fits():
    tried = []

    def trial(size):  # as if a micro-batch of more than 6 sequences ran out of GPU memory
        tried.append(size)
        if size > 6:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert find_batch_size(trial, [1, 2, 3, 4, 6, 8, 12, 24]) == 6
    assert tried == [24, 12, 8, 6]
    with pytest.raises(TrainingError, match="not even one sequence"):
        find_batch_size(trial, [8, 12])


def test_only_a_large_vocabulary_is_padded_to_a_multiple_of_64():
    assert padded_vocab(50257) == 50304  # GPT-2's: 0.09% more
    assert padded_vocab(50304) == 50304
    assert padded_vocab(65) == 65  # tiny-shakespeare's characters: padding would nearly double it


def test_samples_at_evaluations_continue_the_prompt_and_reach_tensorboard(tiny_config, tmp_path):
    history = train(tiny_config("sample_interval=10", 'sample_prompt="ROMEO:"', "tensorboard=true"))
    samples = {r["step"]: r["sample"] for r in history if "sample" in r}
    assert list(samples) == [0, 10, 20] and all(len(text) == 100 for text in samples.values())  # 100 characters
    assert samples[0] != samples[20]  # the same random stream each time: what changed is the model
    events = EventAccumulator(str(tmp_path / "logs" / "out"), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.step for e in events.Tensors("sample/text_summary")] == [0, 10, 20]
