"""Picks the implementation of each op: ``backend="auto" | "torch" | "triton"``.

``"auto"`` (the default, overridable with the environment variable ``PKMEM_BACKEND``) uses the
Triton kernels for CUDA tensors when triton imports, and the PyTorch reference otherwise. Asking
for ``"triton"`` where it cannot run is an error, never a silent fallback. The kernels also run on
CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before the first kernel use):
that is how CI tests them. Triton is imported lazily, on the first call that needs it.
"""

from __future__ import annotations

import os

import torch

from pkmem.ops import reference

BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed: backend must be one of {BACKENDS}")
    return backend


_KERNELS: tuple | None = None


def _triton_module():
    """``(pkmem.ops.triton, None)`` if the kernels import, else ``(None, reason)`` (imported once)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            import pkmem.ops.triton as kernels

            _KERNELS = (kernels, None)
        except Exception as e:  # ImportError, or a triton too old for the kernels
            _KERNELS = (None, f"the Triton kernels do not import ({type(e).__name__}: {e})")
    return _KERNELS


def _interpreting() -> bool:
    kernels, _ = _triton_module()
    return kernels is not None and kernels.INTERPRET


_REASONS: dict[tuple, str | None] = {}


def triton_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """Why the kernels cannot run on ``tensors`` (None if they can); remembered per device types,
    dtypes and ``TRITON_INTERPRET``."""
    return _reason_for(tuple((t.device.type, t.dtype) for t in tensors))


def _reason_for(descs: tuple[tuple[str, torch.dtype], ...]) -> str | None:
    key = (os.environ.get("TRITON_INTERPRET", "0"), *descs)
    if key not in _REASONS:
        _REASONS[key] = _unavailable_reason(descs)
    return _REASONS[key]


def _unavailable_reason(descs: tuple[tuple[str, torch.dtype], ...]) -> str | None:
    devices = {device for device, _ in descs}
    if len(devices) > 1:
        return f"the tensors are on several device types {sorted(devices)}"
    device = devices.pop() if devices else "cpu"
    if device not in ("cuda", "cpu"):
        return f"the kernels need CUDA tensors (got {device} tensors)"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "the tensors are on the CPU (the kernels need CUDA tensors, or TRITON_INTERPRET=1 set)"
    bad = [dtype for _, dtype in descs if dtype.is_floating_point and dtype not in _KERNEL_DTYPES]
    if bad:
        return f"the kernels support float32, bfloat16 and float16 tensors (got {bad[0]})"
    _, reason = _triton_module()
    if reason is not None:
        return reason
    if device == "cpu" and not _interpreting():
        return "TRITON_INTERPRET=1 was set after the kernels were imported (set it before the first use)"
    if device == "cuda" and _interpreting():
        return "the kernels were imported under TRITON_INTERPRET=1, which runs them on CPU tensors only"
    return None


_RESOLVED: dict[tuple, str] = {}

# os.environ.get costs microseconds for a name that is not set (it raises and catches a KeyError):
# the variables' raw values are read from the environment's own dict, where CPython keeps it
_ENV = getattr(os.environ, "_data", None)
_ENV_NAMES = ("PKMEM_BACKEND", "TRITON_INTERPRET")
if _ENV is not None and hasattr(os.environ, "encodekey"):
    _ENV_KEYS = tuple(os.environ.encodekey(n) for n in _ENV_NAMES)
else:  # pragma: no cover - not CPython
    _ENV, _ENV_KEYS = os.environ, _ENV_NAMES


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """The concrete backend ("torch" or "triton") for an op on ``tensors``: decided once per
    backend, ``PKMEM_BACKEND``, ``TRITON_INTERPRET``, device types and dtypes (this runs on every
    op call: the host's time per call). Under ``torch.compile`` the decision is a constant of the
    traced graph (no graph break, whether or not an eager call came first)."""
    if torch.compiler.is_compiling():
        resolved = _resolve_constant(backend, tuple((t.device.type, t.dtype) for t in tensors))
        if resolved.startswith(_ERROR):
            raise ValueError(resolved[len(_ERROR) :])
        return resolved
    key = (
        backend,
        _ENV.get(_ENV_KEYS[0]),
        _ENV.get(_ENV_KEYS[1]),
        *[(t.is_cuda or t.device.type, t.dtype) for t in tensors],  # (is_cuda: no device object)
    )
    resolved = _RESOLVED.get(key)
    if resolved is None:  # an error is raised again on every call, not cached
        resolved = _resolve(backend, tuple((t.device.type, t.dtype) for t in tensors))
        _RESOLVED[key] = resolved
    return resolved


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (over a
    second) when pkmem is imported: that function only sets this mark, which dynamo reads when it
    traces a call of ``fn`` (tests/test_layer_compile.py checks that it still does)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _resolve_constant(backend: str, descs: tuple[tuple[str, torch.dtype], ...]) -> str:
    """:func:`_resolve`, run by ``torch.compile`` while it traces and kept as a constant of the graph:
    ``PKMEM_BACKEND`` and ``TRITON_INTERPRET`` are read then (after changing them, a compiled model
    needs ``torch._dynamo.reset()``). An error comes back as its message, raised by the caller as
    the ValueError an eager call raises."""
    try:
        return _resolve(backend, descs)
    except ValueError as e:
        return _ERROR + str(e)


_ERROR = "error: "


def _resolve(backend: str, descs: tuple[tuple[str, torch.dtype], ...]) -> str:
    check_backend(backend)
    if backend == "auto":
        env = os.environ.get("PKMEM_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"PKMEM_BACKEND={env!r} is not allowed: it must be one of {BACKENDS}")
        backend = env
    if backend == "torch":
        return "torch"
    if backend == "auto":
        cuda = len(descs) > 0 and all(device == "cuda" for device, _ in descs)
        return "triton" if cuda and _reason_for(descs) is None else "torch"
    reason = _reason_for(descs)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run here: {reason}. Use backend='auto' or 'torch'.")
    return "triton"


def _check_topk(topk: int, n: int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 < topk <= n:
        raise ValueError(f"topk={topk!r} is not allowed: topk must be an int in [1, {n}]")


def product_topk(query: torch.Tensor, subkeys: torch.Tensor, topk: int, backend: str = "auto"):
    """See :func:`pkmem.ops.reference.product_topk`."""
    return product_lookup(query, subkeys, topk, "none", 1.0, backend)


def product_lookup(
    query: torch.Tensor,
    subkeys: torch.Tensor,
    topk: int,
    score: str = "softmax",
    temperature: float = 1.0,
    backend: str = "auto",
):
    """See :func:`pkmem.ops.reference.product_lookup` (the kernel applies the score function to the
    selected scores in registers, forward and backward). Float32 products follow torch's float32
    matmul precision at the call ("highest", the default: exact float32; "high" / "medium": tf32),
    in both backends."""
    temperature = reference.check_score(score, temperature)
    if resolve_backend(backend, query, subkeys) == "triton":
        T, H, kd = query.shape
        if subkeys.dim() != 4 or subkeys.shape[0] != H or subkeys.shape[1] != 2 or 2 * subkeys.shape[3] != kd:
            raise ValueError(
                f"query {tuple(query.shape)} and subkeys {tuple(subkeys.shape)}: subkeys must be "
                f"(heads, 2, num_keys, k_dim // 2) = ({H}, 2, n, {kd // 2})"
            )
        n = subkeys.shape[2]
        _check_topk(topk, n)
        if n * n >= 2**31:
            raise ValueError(
                f"num_keys={n} is not allowed with backend='triton': num_keys**2 must be < 2**31"
            )
    return run_product_lookup(query, subkeys, topk, score, temperature, backend)


def flat_topk(query, keys, topk: int, backend: str = "auto"):
    """See :func:`pkmem.ops.reference.flat_topk` (no kernel: flat keys are the paper's ablation)."""
    check_backend(backend)
    return reference.flat_topk(query, keys, topk)


def weighted_gather(values, indices, weights, sparse: bool = False, backend: str = "auto"):
    """See :func:`pkmem.ops.reference.weighted_gather`."""
    if resolve_backend(backend, values, indices, weights) == "triton" and not torch.compiler.is_compiling():
        reference.check_indices_below(indices, values.shape[0], "values.shape[0]")  # CPU tensors only
    return run_weighted_gather(values, indices, weights, sparse, backend)


def batch_norm(
    x,
    weight,
    bias,
    mask,
    eps: float,
    training: bool,
    running_mean=None,
    running_var=None,
    backend: str = "auto",
    momentum: float | None = None,
    shift=None,
):
    """See :func:`pkmem.ops.reference.batch_norm` (the kernels read x in its dtype, write the
    output and the gradient of x in x's dtype (float32 output for float32 x), and update the
    running statistics in their normalising pass)."""
    reference.check_batch_norm(x, weight, bias, mask, training, running_mean, running_var, momentum, shift)
    args = (x, weight, bias, mask, eps, training, running_mean, running_var, backend, momentum, shift)
    return run_batch_norm(*args)


# ---- the ops on checked arguments ------------------------------------------------------------------
#
# What ProductKeyMemory calls: its configuration (score, temperature, top-k, the shapes of its
# parameters) is checked once, when it is built, so a call only picks the implementation (decided
# once per device types and dtypes). The functions above check their arguments, then call these.


def run_product_lookup(query, subkeys, topk: int, score: str, temperature: float, backend: str = "auto"):
    """:func:`product_lookup` on checked arguments (``temperature`` a float)."""
    if resolve_backend(backend, query, subkeys) == "torch":
        return reference.product_lookup(query, subkeys, topk, score, temperature)
    kernels, _ = _triton_module()
    if torch.compiler.is_compiling():
        _prepare_outside_graphs(topk, query.device)
    return kernels.lookup(query, subkeys, topk, score, temperature, kernels.float32_precision())


@_assume_constant_result
def _prepare_outside_graphs(topk: int, device: torch.device) -> bool:
    """Run while ``torch.compile`` traces: makes the search kernel's cached candidate table now.
    Made by the compiled graph's first run instead, it would be allocated in the graph's CUDA-graph
    pool (mode="reduce-overhead"), an error ("tensor(s) in the cudagraph pool not tracked as
    outputs") when it outlives that run."""
    kernels, _ = _triton_module()
    kernels.prepare_search(topk, device)
    return True


def run_weighted_gather(values, indices, weights, sparse: bool = False, backend: str = "auto"):
    """:func:`weighted_gather` on checked arguments."""
    if resolve_backend(backend, values, indices, weights) == "torch":
        return reference.weighted_gather(values, indices, weights, sparse)
    kernels, _ = _triton_module()
    return kernels.weighted_gather(values, indices, weights, sparse)


def run_batch_norm(
    x, weight, bias, mask, eps: float, training: bool, running_mean=None, running_var=None,
    backend: str = "auto", momentum: float | None = None, shift=None,
):  # fmt: skip
    """:func:`batch_norm` on checked arguments."""
    args = (x, weight, bias, mask, eps, training, running_mean, running_var, momentum, shift)
    # the tensors the op reads: the running statistics only in eval or when it updates them
    stats = not training or momentum is not None
    used = (x, weight, bias, mask, shift, *((running_mean, running_var) if stats else ()))
    if resolve_backend(backend, *[t for t in used if t is not None]) == "torch":
        return reference.normalize(*args)
    kernels, _ = _triton_module()
    return kernels.normalize(*args)
