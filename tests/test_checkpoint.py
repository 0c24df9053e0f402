import os

import pytest
import torch

from gptrain.checkpoint import CheckpointError, clean_state_dict, load_checkpoint, atomic_torch_save


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"model": {"w": torch.ones(3)}, "iter_num": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a pre-emption signal in the middle of torch.save

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"model": {"w": torch.zeros(3)}, "iter_num": 2}, path)
    state = load_checkpoint(path)
    assert state["iter_num"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


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


def test_checkpoint_gets_the_usual_file_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_torch_save({"model": {}}, tmp_path / "ckpt.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o644
