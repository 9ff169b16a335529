"""Helpers shared by the Triton kernels: key packing for exact top-k, sizes, the interpreter flag."""

from __future__ import annotations

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
