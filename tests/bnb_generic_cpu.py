"""bitsandbytes' generic CPU 4-bit arithmetic on every x86-64 CPU, for whatever compares with it.

Why this exists (README, "bitsandbytes on AVX-512-BF16 CPUs"; ../shared/REFERENCE_NOTES.md):
bitsandbytes 0.50.2 quantizes 4-bit weights over the *flattened* tensor, blocks of `blocksize`
consecutive values, but its CPU `dequantize_4bit` kernel (backends/cpu/ops.py) hands the bytes to a
C routine as (rows, columns) and counts blocks inside each row. When a row's length is not a
multiple of the blocksize - a (96, 96) weight with blocks of 64 - the two disagree. On CPUs whose C
routine takes the AVX-512 path (seen on CPUs with `avx512_bf16`) that routine returns wrong values
(max error 2.0 on N(0, 1) weights instead of 0.45); elsewhere it happens to be right. On the same
CPUs `Linear4bit.forward` first repacks its weight for an AVX-512 matmul kernel, which crashed on
some shapes. bitsandbytes' own generic path, `backends/default/ops.py::_dequantize_4bit_compute`
on the flattened bytes, is right everywhere, and nf4.py matches it bit for bit.

`use_generic_cpu_path()` makes bitsandbytes compute that way for the rest of the process:
  1. the "cpu" kernel of the `bitsandbytes::dequantize_4bit` operator is re-registered to the generic
     computation, so `bitsandbytes.functional.dequantize_4bit`, `matmul_4bit` and everything built on
     them (Linear4bit, transformers' 4-bit models, peft's QLoRA layers) use it;
  2. `has_avx512bf16` reports False to bitsandbytes, so no `Linear4bit` created afterwards repacks
     its weight for the AVX-512 kernel.
tests/conftest.py calls it once per test session; benchmarks that compare with bitsandbytes call it
at start. Nothing in a root file uses it: our own code never calls bitsandbytes' CPU kernels.
"""
import warnings
from pathlib import Path

_state = {"applied": False, "bitsandbytes_saw_avx512bf16": None}


def cpu_flags(names=("avx2", "avx512f", "avx512_bf16")) -> dict:
    """Which of these flags /proc/cpuinfo lists (all False where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {name: False for name in names}
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return {name: name in flags for name in names}


def generic_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    """bitsandbytes' generic CPU dequantization, with the signature of its operator's kernel."""
    import torch
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)                           # packed storage may be another dtype
    code = _get_4bit_code(quant_type, A.device)
    return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)


def use_generic_cpu_path() -> bool:
    """Route bitsandbytes' CPU 4-bit dequantization to its generic path for this process (idempotent).

    Returns whether bitsandbytes itself had detected AVX-512 BF16 before the patch, i.e. whether
    this CPU is one where the kernel's arithmetic differs."""
    if _state["applied"]:
        return _state["bitsandbytes_saw_avx512bf16"]
    import torch
    import bitsandbytes.functional as functional
    import bitsandbytes.nn.modules as modules

    _state["bitsandbytes_saw_avx512bf16"] = bool(functional.has_avx512bf16())
    with warnings.catch_warnings():
        # torch warns "Overriding a previously registered kernel": that override is the point
        warnings.simplefilter("ignore", UserWarning)
        # A Library handle with allow_override: torch.library.register_kernel refuses to replace a
        # kernel that bitsandbytes itself registered from Python, which it does on some torch builds
        # (seen with torch 2.11 + CUDA); the handle is kept so the registration lives as long as the process.
        _state["library"] = torch.library.Library("bitsandbytes", "IMPL")
        _state["library"].impl("dequantize_4bit", generic_dequantize_4bit, "CPU", allow_override=True)

    def no_avx512bf16():
        return False

    functional.has_avx512bf16 = no_avx512bf16             # read by code that looks it up at call time
    modules.has_avx512bf16 = no_avx512bf16                # Linear4bit.__init__ reads it from here
    _state["applied"] = True
    return _state["bitsandbytes_saw_avx512bf16"]


def native_dequantize_4bit_nf4(A, absmax, blocksize, shape):
    """What bitsandbytes' own CPU kernel computes for fp32 NF4: its C routine, called exactly as
    backends/cpu/ops.py calls it (bytes as (rows, columns / 2), blocks counted per row). For the test
    that shows the disagreement; after `use_generic_cpu_path()` the operator no longer reaches it."""
    import ctypes as ct
    from math import prod

    import torch
    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import get_ptr

    shape = tuple(shape) if len(shape) > 1 else (1, shape[0])
    m, n = prod(shape[:-1]), shape[-1]
    A = A.view(torch.uint8).reshape(m, n // 2)
    absmax = absmax.float().contiguous()                  # kept alive while C reads it
    out = torch.empty(shape, dtype=torch.float32)
    lib.cdequantize_blockwise_cpu_nf4_fp32(get_ptr(A), get_ptr(absmax), get_ptr(out),
                                           ct.c_longlong(blocksize), ct.c_longlong(m), ct.c_longlong(n))
    return out
