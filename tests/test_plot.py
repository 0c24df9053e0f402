import json
import math
import sys

import numpy as np
import pytest

from gptrain import plot

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, *, with_tokens: bool, tokens_per_step=4096, bpb=False, steps=range(0, 2001, 10)):
    """A fake run folder: a train record every step in `steps`, a val record every 500 steps."""
    run_dir.mkdir(parents=True)
    records = []
    for step in steps:
        loss = 3.0 + 7.0 * math.exp(-step / 300) + 0.05 * math.sin(step)  # a falling, noisy curve
        record = {"step": step, "train/loss": loss, "lr": 6e-4, "grad_norm": 1.0}
        if step % 500 == 0:
            record = {"step": step, "val/loss": loss + 0.1, "eval/train_loss": loss}
            if bpb:
                record["val/bpb"] = (loss + 0.1) / math.log(2) / 4
        if with_tokens:
            record["tokens"] = step * tokens_per_step
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # as record_yaml writes it: with tokens_per_step set, the accumulation stays null
    (run_dir / "config.yaml").write_text(f"batch_size: 8\nblock_size: 256\ntokens_per_step: {tokens_per_step}\n"
                                         "gradient_accumulation_steps: null\n")
    return run_dir


def test_two_runs_make_a_readable_png(tmp_path, capsys):
    import matplotlib.image

    a = write_run(tmp_path / "baseline", with_tokens=True, bpb=True)
    b = write_run(tmp_path / "older", with_tokens=False, tokens_per_step=8192)
    out = tmp_path / "figures" / "curves.png"  # the folder does not exist yet
    plot.main([str(a), str(b), "-o", str(out), "--title", "two runs"])
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(out).shape
    assert 300 < height < 2000 and 600 < width < 4000  # two panels side by side: wider than tall


def test_tokens_fall_back_to_step_times_tokens_per_step(tmp_path):
    run = plot.load_run(write_run(tmp_path / "run", with_tokens=False, tokens_per_step=8192))
    for series in run.values():
        np.testing.assert_array_equal(series.tokens, series.step * 8192)
    assert run["val/loss"].step.tolist() == [0, 500, 1000, 1500, 2000]


def test_tokens_per_step_from_the_micro_batch_when_unset():
    assert plot.tokens_per_step({"tokens_per_step": 491520, "gradient_accumulation_steps": None}) == 491520
    config = {"tokens_per_step": None, "batch_size": 12, "block_size": 1024, "gradient_accumulation_steps": 40}
    assert plot.tokens_per_step(config) == 12 * 1024 * 40
    with pytest.raises(plot.PlotError, match="tokens_per_step"):
        plot.tokens_per_step({"tokens_per_step": None, "batch_size": "auto", "block_size": 1024,
                              "gradient_accumulation_steps": 40})


def test_a_resumed_run_replaces_the_steps_it_logs_again(tmp_path):
    run_dir = write_run(tmp_path / "run", with_tokens=True, steps=range(0, 30, 10))
    with open(run_dir / "metrics.jsonl", "a") as f:  # resumed from a checkpoint at step 10
        f.write(json.dumps({"step": 20, "train/loss": 1.0, "tokens": 20 * 4096}) + "\n")
    series = plot.load_run(run_dir)["train/loss"]
    assert series.step.tolist() == [10, 20] and series.value[-1] == 1.0  # step 0 is a val record


@pytest.mark.parametrize("contents", [None, "", "\n"])
def test_a_run_without_metrics_is_one_line_and_exit_2(tmp_path, capsys, contents):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if contents is not None:
        (run_dir / "metrics.jsonl").write_text(contents)
    with pytest.raises(SystemExit) as e:
        plot.main([str(run_dir), "-o", str(tmp_path / "curves.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "curves.png").exists()


def test_missing_config_is_named_when_tokens_are_absent(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", with_tokens=False)
    (run_dir / "config.yaml").unlink()
    with pytest.raises(SystemExit) as e:
        plot.main([str(run_dir)])
    assert e.value.code == 2 and "config.yaml" in capsys.readouterr().err


def test_without_matplotlib_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as e:
        plot.main([str(write_run(tmp_path / "run", with_tokens=True))])
    assert e.value.code == 2 and 'pip install "gptrain[plot]"' in capsys.readouterr().err


@pytest.mark.parametrize("bpb, panels", [(False, 1), (True, 2)])
def test_a_panel_is_drawn_for_each_kind_of_metric_a_run_has(tmp_path, bpb, panels):
    import matplotlib.image

    run = write_run(tmp_path / "run", with_tokens=True, bpb=bpb)
    plot.main([str(run), "-o", str(tmp_path / "curves.png")])
    height, width, _ = matplotlib.image.imread(tmp_path / "curves.png").shape
    assert (width, height) == (780 * panels, 540)  # 6.5 x 4.5 inches a panel, at 120 dpi


def test_the_evaluated_train_loss_is_enough_and_bits_per_byte_alone_is_not(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "tokens": 0, "eval/train_loss": 4.0}) + "\n")
    plot.main([str(run), "-o", str(tmp_path / "a.png")])
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "tokens": 0, "val/bpb": 1.0}) + "\n")
    with pytest.raises(SystemExit):
        plot.main([str(run), "-o", str(tmp_path / "b.png")])
    assert capsys.readouterr().err == f"error: {run}/metrics.jsonl holds no train or val loss\n"
