import sys

import pytest
import torch

from gptrain import device as device_module
from gptrain.config import ConfigError
from gptrain.device import autocast, keep_freed_host_memory, native_bfloat16, resolve_device, resolve_dtype


def test_auto_picks_the_cpu_and_float32_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    device = resolve_device("auto")
    assert device == torch.device("cpu") and resolve_dtype("auto", device) == torch.float32


def test_each_process_under_torchrun_takes_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", local_rank=3, distributed=True) == torch.device("cuda:3")


def test_auto_dtype_on_gpus_without_native_bf16_is_float16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16


@pytest.mark.parametrize("flags, cap, native", [
    ("fpu sse4_2 avx2 fma", {}, False),  # an AMD EPYC without AVX-512: bfloat16 matmuls 7x slower than float32
    ("avx2 avx512f avx512bw", {}, False),  # AVX-512 without its bfloat16 dot product
    ("avx512f avx512_bf16", {}, True),
    ("avx512f avx512_bf16 amx_bf16 amx_tile", {}, True),
    # oneDNN told to stop below AVX512_CORE_BF16, by either name of the variable
    ("avx512f avx512_bf16 amx_bf16 amx_tile", {"ONEDNN_MAX_CPU_ISA": "avx2"}, False),
    ("avx512f avx512_bf16 amx_bf16 amx_tile", {"DNNL_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, False),
    ("avx512f avx512_bf16 amx_bf16 amx_tile", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
    ("avx512f avx512_bf16 amx_bf16 amx_tile", {"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
])
def test_native_bfloat16_on_a_cpu_follows_its_flags_and_onednns_cap(flags, cap, native, tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(device_module, "CPUINFO", cpuinfo)
    for name in device_module.ONEDNN_CAPS:
        monkeypatch.delenv(name, raising=False)
    for name, value in cap.items():
        monkeypatch.setenv(name, value)
    assert native_bfloat16(torch.device("cpu")) is native


def test_native_bfloat16_on_gpus_needs_bf16_tensor_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not native_bfloat16(torch.device("cuda"))  # emulated only: a V100 or T4
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert native_bfloat16(torch.device("cuda"))
    monkeypatch.setattr(device_module, "CPUINFO", tmp_path / "absent")  # not Linux: no flags, no claim
    assert not native_bfloat16(torch.device("cpu")) and not native_bfloat16(torch.device("mps"))


def test_asking_for_a_missing_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="PyTorch sees no CUDA GPU; use device=cpu or device=auto"):
        resolve_device("cuda")


def test_float32_runs_without_autocast():
    with autocast(torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc's malloc")
def test_glibc_accepts_the_thresholds_that_keep_freed_host_memory():
    # what that saves, page faults per step, is measured by bench/page_faults.py: a count that depends on
    # the allocator, the kernel and what else the process holds is no test
    assert keep_freed_host_memory() in (1 << 30, 32 << 20)
