import errno
import io
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

from gptrain.checkpoint import (
    CheckpointError, Progress, clean_state_dict, load_checkpoint, newest_checkpoint, save_checkpoint,
)
from gptrain.config import GPTConfig
from gptrain.model import GPT
from gptrain import train as trainer
from gptrain.train import main as train_main
from gptrain.train import train


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=8))
    save_checkpoint(tmp_path, model=model, progress=Progress(step=1))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a pre-emption signal in the middle of torch.save

    monkeypatch.setattr(torch, "save", crash)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model=model, progress=Progress(step=2))
    checkpoint = load_checkpoint(tmp_path / "ckpt.pt")
    assert checkpoint.progress.step == 1
    assert all(torch.equal(checkpoint.tensors["model"][name], tensor) for name, tensor in before.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000001.pt", "ckpt.pt"]  # no temporary file left


def test_compile_and_ddp_prefixes_are_stripped():
    sd = {"_orig_mod.wte.weight": 1, "module._orig_mod.h.0.w": 2, "module.ln_f.bias": 3, "lm_head.weight": 4}
    assert clean_state_dict(sd) == {"wte.weight": 1, "h.0.w": 2, "ln_f.bias": 3, "lm_head.weight": 4}


class Executable:
    def __reduce__(self):
        return (print, ("code from a pickle",))


def test_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Executable()}, path)
    with pytest.raises(CheckpointError, match=f"cannot load {path}"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_corrupt_checkpoint_is_refused_by_its_checksum(tiny_config, tmp_path):
    train(tiny_config("max_iters=2", "eval_interval=2"))
    path = tmp_path / "out" / "ckpt-000002.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["transformer.wte.weight"][0, 0] += 1e-3  # one weight changed, the checksum kept
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not match the checksum saved with it: it is corrupt, or was "
                                              "changed after it was written. If you edited it on purpose, delete its "
                                              "'checksum' entry"):
        load_checkpoint(path)
    del state["checksum"]  # edited on purpose, as the message says: it then loads, unverified
    torch.save(state, path)
    assert load_checkpoint(path).tensors["model"]["transformer.wte.weight"][0, 0] == state["model"]["transformer.wte.weight"][0, 0]


def changed_weight(data: bytes) -> bytes:
    """The checkpoint's bytes with one weight changed and its stored checksum kept."""
    state = torch.load(io.BytesIO(data), weights_only=True)
    state["model"]["transformer.wte.weight"][0, 0] += 1e-3
    out = io.BytesIO()
    torch.save(state, out)
    return out.getvalue()


@pytest.mark.parametrize("damage, why", [
    (lambda data: data[:len(data) // 2], "not a file torch.save wrote, or one cut short"),
    (changed_weight, "does not match the checksum saved with it"),
], ids=["truncated", "corrupt"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(damage, why, tiny_config, tmp_path, capsys):
    whole = train(tiny_config("max_iters=8", "eval_interval=2", f"out_dir={tmp_path / 'whole'}"))
    train(tiny_config("max_iters=6", "eval_interval=2"))
    newest = tmp_path / "out" / "ckpt-000006.pt"
    data = newest.read_bytes()
    newest.unlink()  # ckpt.pt, its hard link, keeps the bytes; damage both names' copies
    newest.write_bytes(damage(data))
    (tmp_path / "out" / "ckpt.pt").unlink()
    os.link(newest, tmp_path / "out" / "ckpt.pt")
    capsys.readouterr()
    resumed = train(tiny_config("max_iters=8", "eval_interval=2", "init_from=resume"))
    out = capsys.readouterr().out
    assert "note: skipped a checkpoint: " in out and why in out
    assert f"resuming from {tmp_path / 'out' / 'ckpt-000004.pt'} (iter 4)" in out
    train_loss = lambda h: {r["step"]: r["train/loss"] for r in h if "train/loss" in r}  # noqa: E731
    assert train_loss(resumed) == {s: v for s, v in train_loss(whole).items() if s >= 4}
    assert load_checkpoint(newest).progress.step == 6  # written again, whole, by the resumed run
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt").progress.step == 8


FULL, DENIED = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OSError(errno.EACCES, os.strerror(errno.EACCES))


@pytest.mark.parametrize("error, policy, failing, signal_after", [
    (FULL, "stop", 1, None),  # the save at iter 4 fails: the run stops, ckpt-000002 stays
    (DENIED, "stop", 1, None),  # no permission: the same (root bypasses file modes, so the error is injected)
    (FULL, "retry", 2, None),  # the last save has no next evaluation to retry at: it stops either way
    (FULL, "retry", 1, 2),  # a stop signal during step 2: the save it asks for stops the run either way
], ids=["full-stop", "denied-stop", "full-retry-final", "full-retry-signal"])
def test_a_save_that_fails_stops_the_run_and_loses_no_earlier_checkpoint(tiny_args, tmp_path, monkeypatch, capsys,
                                                                           error, policy, failing, signal_after):
    save, saves, step_once = torch.save, iter(range(100)), trainer.train_step

    def failing_save(obj, f):
        if next(saves) == failing:
            f.write(b"the first bytes of a checkpoint")
            raise error
        save(obj, f)

    def signalled_step(run):
        if run.state.progress.step == signal_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_once(run)

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(trainer, "train_step", signalled_step)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train_main(tiny_args("max_iters=6", "eval_interval=2", f"on_save_error={policy}"))
    err = capsys.readouterr().err
    step = 3 if signal_after is not None else 2 * (failing + 1)
    assert stop.value.code == 1 and err.count("\n") == 1  # a failure at run time, in one line
    assert err.startswith(f"error: cannot write the checkpoint of iter {step} to {out}: {error.strerror}; the earlier "
                          f"ones are untouched; make room (or fix permissions) and continue with init_from=resume")
    assert err.endswith(", or set on_save_error=retry\n") == (policy == "stop" and step < 6)
    kept = sorted(int(p.name[5:11]) for p in out.glob("ckpt-??????.pt"))
    assert kept == [2 * n for n in range(1, failing + 1)] and load_checkpoint(out / "ckpt.pt").progress.step == kept[-1]


def test_with_retry_a_failed_save_is_tried_again_at_the_next_evaluation(tiny_args, tmp_path, monkeypatch, capsys):
    save, saves = torch.save, iter(range(100))

    def disk_full_at_the_second_save(obj, f):
        if next(saves) == 1:
            f.write(b"the first bytes of a checkpoint")
            raise FULL
        save(obj, f)

    monkeypatch.setattr(torch, "save", disk_full_at_the_second_save)
    out = tmp_path / "out"
    train_main(tiny_args("max_iters=6", "eval_interval=2", "on_save_error=retry"))
    assert (f"warning: cannot write the checkpoint of iter 4 to {out}: No space left on device; the earlier ones "
            f"are untouched; trying again at the next evaluation") in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*ckpt*")) == ["ckpt-000002.pt", "ckpt-000006.pt", "ckpt-best.pt", "ckpt.pt"]
    assert load_checkpoint(out / "ckpt.pt").progress.step == 6


def newest_saved(out_dir) -> int:
    """The step of the newest numbered checkpoint, -1 if none."""
    return max((int(p.name[5:11]) for p in out_dir.glob("ckpt-??????.pt")), default=-1)


# The temporary file of a checkpoint being written; the atomic write removes it on any exit but SIGKILL's.
SAVING = ".ckpt-*.pt.*.tmp"


def test_a_run_killed_at_random_moments_ends_as_the_run_never_killed(tiny_args, tmp_path):
    """SIGKILL at KILLS random moments, resuming after each: a verifiable checkpoint is there after every
    kill, and the final weights equal the uninterrupted run's bit for bit. Every third kill is sent the
    moment a checkpoint's temporary file appears; a kill counts as inside a save only when the file outlives
    the process, which it does when the kill landed before the rename. The runs are forked from a server
    that has imported gptrain, so each starts in a fraction of a second; they aim at a max_iters they never
    reach, and the last one stops a few steps past the progress the killed ones made (the schedule ends at
    lr_decay_iters, so max_iters changes nothing else)."""
    kills, common = 21, ("lr_decay_iters=100", "eval_interval=3", "eval_iters=1", "dropout=0.1", "n_embd=128",
                         "log_interval=100")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["gptrain.train"])
    out, rng, inside_a_save = tmp_path / "out", random.Random(0), 0
    for kill in range(kills):
        resume = "init_from=resume" if (out / "ckpt.pt").exists() else "init_from=scratch"
        left_before = set(out.glob(SAVING))  # by the kills before, which nothing cleans up
        run = context.Process(target=train_main, args=(tiny_args(*common, "max_iters=1000000", resume),))
        run.start()
        if kill % 3 == 2:  # at the next save's temporary file
            while run.is_alive() and set(out.glob(SAVING)) <= left_before:
                pass
        else:  # once the run has made a save of its own, at a random moment of the next 0.3 s
            saved = newest_saved(out)
            while run.is_alive() and newest_saved(out) == saved:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.3))
        assert run.is_alive()
        run.kill()
        run.join()
        inside_a_save += bool(set(out.glob(SAVING)) - left_before)
        if (out / "ckpt.pt").exists():
            _, skipped = newest_checkpoint(out)
            assert skipped == []
    assert inside_a_save >= 6  # 7 of 7 aimed kills landed in 3 runs out of 3 on a loaded machine
    end = load_checkpoint(out / "ckpt.pt").progress.step + 5
    assert end >= 3 * 14  # each kill but those aimed at a save came after a save of the run it killed
    train_main(tiny_args(*common, f"max_iters={end}", "init_from=resume"))
    train_main(tiny_args(*common, f"max_iters={end}", f"out_dir={tmp_path / 'whole'}"))
    whole, resumed = load_checkpoint(tmp_path / "whole" / "ckpt.pt"), load_checkpoint(out / "ckpt.pt")
    assert whole.progress.step == resumed.progress.step == end
    for name, tensor in whole.tensors["model"].items():
        assert torch.equal(tensor, resumed.tensors["model"][name]), name


def test_a_save_clears_what_a_save_killed_mid_write_left(tmp_path):
    """SIGKILL skips the cleanup a failing save does: its temporary file (checkpoint-sized) stays until the
    next save removes it."""
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=8))
    leftovers = [tmp_path / ".ckpt-000002.pt.k1ll3d.tmp", tmp_path / ".ckpt.pt.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path, model=model, progress=Progress(step=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000003.pt", "ckpt.pt"]


def test_the_newest_keep_last_n_and_the_best_are_kept(tiny_config, tmp_path):
    history = train(tiny_config("max_iters=12", "eval_interval=2", "keep_last_n=2"))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("ckpt*.pt")) == ["ckpt-000010.pt", "ckpt-000012.pt", "ckpt-best.pt",
                                                           "ckpt.pt"]
    assert (out / "ckpt.pt").samefile(out / "ckpt-000012.pt")
    val = {r["step"]: r["val/loss"] for r in history if "val/loss" in r and r["step"] > 0}
    assert load_checkpoint(out / "ckpt-best.pt").progress.best_val_loss == pytest.approx(min(val.values()))
