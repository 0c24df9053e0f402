"""Which device and precision a run uses, chosen for the hardware unless the user says otherwise."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from contextlib import AbstractContextManager, nullcontext
from importlib import metadata
from pathlib import Path

import torch

from gptrain.config import DEVICES, ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPUINFO = Path("/proc/cpuinfo")
# The variables that cap oneDNN's instruction sets (the older name counts where the newer is unset), and
# oneDNN's names of the sets at or past AVX512_CORE_BF16, its first with a bfloat16 dot product: a cap at
# any other (AVX2, say) makes oneDNN emulate bfloat16 matmuls on any CPU. DEFAULT and ALL cap nothing.
ONEDNN_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
ISAS_WITH_BF16 = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
                  "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "DEFAULT", "ALL"}


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """auto: CUDA, else Apple's MPS, else the CPU. Under torchrun each process takes GPU `local_rank`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.split(":")[0] not in DEVICES:
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps (got '{name}')")
    if name == "cuda" and distributed:
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but PyTorch sees no CUDA GPU; use device=cpu or device=auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but MPS is not available; use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where the GPU supports it, float16 on older GPUs, float32 elsewhere."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        # V100s and T4s only emulate bf16, slowly; they get float16 with a gradient scaler
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return DTYPES[name]


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a GPU with bfloat16 tensor cores, or a
    CPU with AVX512-BF16 or AMX (that oneDNN may use). Elsewhere bfloat16 is emulated, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    cap = next((os.environ[name] for name in ONEDNN_CAPS if os.environ.get(name)), None)
    if cap is not None and cap.upper() not in ISAS_WITH_BF16:  # a set it does not know: assume the slow path
        return False
    try:
        flags = set(CPUINFO.read_text().split())
    except OSError:  # not Linux: no flags to read, so no claim of native bfloat16
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Mixed precision for matmuls; float32 runs as it is."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_host_memory() -> int | None:
    """Let glibc keep freed memory for reuse instead of returning it to the OS; returns the mmap
    threshold set (None where there is no glibc to tune).

    A CPU training step frees and reallocates the same activation buffers every step. By default glibc
    unmaps large blocks on free and trims the heap's top, so each step faults hundreds of pages back
    in, zeroed. Raising both thresholds keeps them, and the process's memory stays at its peak, which
    a training run reaches every step anyway. glibc before 2.35 refuses an mmap threshold over 32 MiB;
    it then gets 32 MiB, since a trim threshold set alone would pin the mmap one at 128 KiB.
    """
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, for one): nothing to tune
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    for threshold in (1 << 30, 32 << 20):
        if libc.mallopt(m_mmap_threshold, threshold):  # 1 on success
            libc.mallopt(m_trim_threshold, 1 << 30)
            return threshold
    return None


def environment(world_size: int) -> dict:
    """What a run ran on, for its run record: enough to reproduce it or to explain a difference."""
    cuda = torch.cuda.is_available()
    return {
        "gptrain": _version(),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "platform": platform.platform(),
        "command": sys.argv,
        "world_size": world_size,
    }


def _version() -> str:
    try:
        return metadata.version("gptrain")
    except metadata.PackageNotFoundError:
        return "not installed (run from a checkout)"


def _git_commit() -> str | None:
    """The checkout's commit, when the code runs from one."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
