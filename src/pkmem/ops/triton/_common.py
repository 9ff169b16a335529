"""Helpers shared by the Triton kernels: key packing for exact top-k, sizes, the interpreter flag,
the float32 product precision (torch's setting) and the properties of the device that the kernels'
block sizes are chosen from."""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

# triton decides at decoration time whether a @triton.jit function is compiled or interpreted
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# tests set this to fill every kernel output with NaN (floats) or a sentinel (ints) before the
# launch, so that an element the kernel forgot to write cannot pass as a correct one
POISON_OUTPUTS = os.environ.get("PKMEM_POISON_OUTPUTS", "0") == "1"

# dot precisions accepted by the kernels (tl.dot's input_precision for float32 operands)
PRECISIONS = ("tf32", "tf32x3", "ieee")


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` is a constexpr function: microseconds per host call)."""
    return -(-a // b)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed: precision must be one of {PRECISIONS}")
    return precision


_PRECISION_GETTER = getattr(torch._C, "_get_fp32_precision_getter", None)  # torch >= 2.9


@torch.compiler.assume_constant_result  # traced as a constant; torch.compile guards on the setting
def float32_precision() -> str:
    """The precision of float32 products that torch's own CUDA matmuls use now: "tf32" after
    ``torch.set_float32_matmul_precision("high")`` or ``("medium")`` (or
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``), else "ieee" (exact float32: torch's
    default, "highest"). Read at every call, as torch's matmuls read it (about a microsecond)."""
    if _PRECISION_GETTER is None:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # torch.backends.cuda.matmul.fp32_precision, without its attribute lookup (the legacy getters
    # raise once the new API has set the flag)
    p = _PRECISION_GETTER("cuda", "matmul")
    if p == "none":  # inherited from the generic setting
        p = _PRECISION_GETTER("generic", "all")
    return "tf32" if p == "tf32" else "ieee"


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to tf32 (10 mantissa bits, to nearest, ties to even; inf and NaN
    stay): what a tensor core reads of a float32 operand. Under the interpreter the kernels'
    tf32 products take their operands through it, so CI sees the GPU's precision."""
    b = x.contiguous().view(torch.int32)
    special = (b & 0x7F800000) == 0x7F800000
    r = (b + 0xFFF + ((b >> 13) & 1)) & -8192
    return torch.where(special, b, r).view(torch.float32)


# ---- the device's properties ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the kernels' block sizes are chosen from: streaming multiprocessors (how many programs
    fill the device), L2 size (which tables stay in L2), shared memory per program (opt-in maximum),
    32-bit registers and threads per multiprocessor (how many programs stay resident)."""

    name: str
    arch: int  # compute capability as major * 10 + minor (80, 86, 89, 90, ...)
    sms: int
    l2_bytes: int
    smem_per_block: int
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048


# Representative GPUs of each architecture from sm_80 (vendor data sheets): CI compiles every
# kernel with the configurations each would choose (tests/ops/compile_for_targets.py).
TARGETS = {
    "A100": DeviceInfo("A100", 80, 108, 40 * 2**20, 163 * 1024),
    "A10": DeviceInfo("A10", 86, 72, 6 * 2**20, 99 * 1024, threads_per_sm=1536),
    "RTX 4090": DeviceInfo("RTX 4090", 89, 128, 72 * 2**20, 99 * 1024, threads_per_sm=1536),
    "L40S": DeviceInfo("L40S", 89, 142, 96 * 2**20, 99 * 1024, threads_per_sm=1536),
    "H100": DeviceInfo("H100", 90, 132, 50 * 2**20, 227 * 1024),
    "H200": DeviceInfo("H200", 90, 132, 60 * 2**20, 227 * 1024),
}

# CPU tensors run under the interpreter: the kernels choose their block sizes as on an H100
INTERPRETER_DEVICE = TARGETS["H100"]


def device_info(device: torch.device) -> DeviceInfo:
    """The properties of ``device`` (:data:`INTERPRETER_DEVICE` for CPU tensors), read once per device."""
    if device.type != "cuda":
        return INTERPRETER_DEVICE
    return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache  # the eager launch path is host-bound: the properties are read once per device
def _cuda_device_info(index: int) -> DeviceInfo:
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0)
    if not smem:
        try:  # the opt-in maximum, as triton checks a kernel's shared memory against it
            from triton.runtime import driver

            smem = driver.active.utils.get_device_properties(index)["max_shared_mem"]
        except Exception:  # the 48 KiB that every CUDA GPU gives without opting in
            smem = p.shared_memory_per_block
    return DeviceInfo(
        name=p.name,
        arch=10 * p.major + p.minor,
        sms=p.multi_processor_count,
        l2_bytes=p.L2_cache_size,
        smem_per_block=smem,
        regs_per_sm=getattr(p, "regs_per_multiprocessor", 65536),
        threads_per_sm=p.max_threads_per_multi_processor,
    )


def new_output(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised kernel output (poisoned when ``POISON_OUTPUTS`` is set)."""
    out = torch.empty(*shape, device=device, dtype=dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else -(2**30))
    return out


@triton.jit
def orderable(x):
    """float32 -> int32 whose signed order is the float order (NaN above +inf, -0.0 just below +0.0)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def from_orderable(b):
    """Inverse of :func:`orderable`."""
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def pack(x, payload):
    """An int64 key ordered as ``x`` (float32), ties broken by ``payload`` (int, 0 <= payload < 2**31).

    Sorting such keys sorts the scores exactly and carries an index along, in one integer."""
    return (orderable(x).to(tl.int64) << 32) | payload.to(tl.int64)


@triton.jit
def unpack_score(key):
    return from_orderable((key >> 32).to(tl.int32))


@triton.jit
def unpack_payload(key):
    return (key & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def key_or_lowest(key, valid, BITS: tl.constexpr):
    """``key`` where ``valid``, else the lowest ``BITS``-bit integer: padding (columns past n,
    unused scratch slots, unused candidate pairs) never wins a tie against a real ``-inf`` score."""
    return tl.where(valid, key, (tl.zeros_like(key) - 1) << (BITS - 1))


# Triton's interpreter multiplies tl.dot's float32 operands exactly; a GPU's tensor cores read them
# in tf32 for input_precision="tf32". Kernels pass their operands through tf32_operand, which
# rounds them under the interpreter, so CI sees the GPU's precision.
_EMULATE_TF32 = tl.constexpr(INTERPRET)


@triton.jit
def tf32_operand(x, PRECISION: tl.constexpr):
    """A float32 ``tl.dot`` operand as the tensor cores read it with ``input_precision=PRECISION``:
    unchanged on the GPU; rounded to tf32 (10 mantissa bits, to nearest) under the interpreter
    for "tf32" (as :func:`round_to_tf32`)."""
    if _EMULATE_TF32:
        if PRECISION == "tf32":
            b = x.to(tl.int32, bitcast=True)
            r = (b + 0xFFF + ((b >> 13) & 1)) & -8192
            x = tl.where((b & 0x7F800000) == 0x7F800000, b, r).to(tl.float32, bitcast=True)
    return x


# Triton's interpreter casts float32 -> bfloat16 by truncation; the GPU (and torch) round to
# nearest, ties to even. Kernels store 16-bit results through to_output, which rounds under the
# interpreter, so CI sees the GPU's values.
_RNE_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def to_output(x, OUT):
    """``x`` (float32) in the element type of the pointer ``OUT``, rounded to nearest (ties to
    even) as the GPU's conversion and torch's ``.to`` do, also under the interpreter (inf and NaN
    stay)."""
    if _RNE_BF16:
        if OUT.dtype.element_ty == tl.bfloat16:
            b = x.to(tl.int32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536  # exact in bfloat16 now: the cast truncates nothing
            x = b.to(tl.float32, bitcast=True)
    return x.to(OUT.dtype.element_ty)
