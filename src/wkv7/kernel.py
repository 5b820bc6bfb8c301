"""WKV7 CUDA/HIP kernel: lazy build and autograd wrapper.

The kernel sources live in cuda/ (wkv7_cuda.cu: the backstepping kernels of SPEC section 2,
wkv7_op.cpp: the torch binding). Nothing is compiled at import: the first call for a head size
builds the extension with torch.utils.cpp_extension.load (ninja; torch caches the build under
~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR) and loads it, which registers the operators
torch.ops.wkv7_n<N>_c16.{forward,backward,build_config}; those are what is called here.
On ROCm (torch.version.hip set) load() hipifies the same .cu file and compiles it with hipcc; the
operators under the same names are then the HIP build.

Public:
- ``wkv7_kernel(r, w, k, v, a, b, state=None) -> (y, state_out)``: (B,T,H,N) inputs of one dtype
  (bf16, fp16 or fp32) on a CUDA/ROCm device, T a multiple of CHUNK_LEN; y in the input dtype,
  state_out (B,H,N,N) fp32 (rows = value index, columns = key index). Differentiable in all six
  inputs and the state.
- ``kernel_available(device) -> bool``: the device is a GPU and a compiler is there (no build).
- ``kernel_applicable(r) -> bool``: kernel_available and r's dtype, head size and T fit the kernel.
- ``load_kernel(head_size)``: build (or fetch the cached) extension; returns its operator namespace.
"""

from __future__ import annotations

import functools
import subprocess
import threading
from pathlib import Path
from typing import Any

import torch

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
CHUNK_LEN = 16  # steps between the states the forward stores for the backward (SPEC 2)
SUPPORTED_HEAD_SIZES = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_HINT = "use bfloat16, float16 or float32"

FALLBACK_HINT = (
    'Use the PyTorch path instead: wkv7(..., impl="torch"), or the flag `--wkv_impl torch` of '
    "train.py and API_DEMO_CHAT.py."
)

_NVCC_FLAGS = ["-res-usage", "--use_fast_math", "-O3", "-Xptxas", "-O3", "--extra-device-vectorization"]
_HIPCC_FLAGS = ["-O3", "-ffast-math"]  # hipcc (clang) equivalents; nvcc-only flags would break it

KernelOps = Any  # torch.ops.wkv7_n<N>_c<CHUNK>: forward, backward, build_config
_loaded: dict[int, KernelOps] = {}
_build_errors: dict[int, str] = {}
_lock = threading.Lock()


@functools.cache
def toolchain_problem() -> str | None:
    """What is missing to build the kernel (nvcc/hipcc, ninja), or None when both are there. Asked
    once per process: is_ninja_available() starts a `ninja --version` subprocess, and the
    dispatcher asks for every layer of every step."""
    from torch.utils import cpp_extension  # heavy import, only when a GPU is there

    hip = bool(torch.version.hip)
    if (cpp_extension.ROCM_HOME if hip else cpp_extension.CUDA_HOME) is None:
        return (f"{'hipcc (ROCm)' if hip else 'nvcc (CUDA toolkit)'} was not found (set "
                f"{'ROCM_HOME' if hip else 'CUDA_HOME'} or put the compiler on PATH)")
    if not cpp_extension.is_ninja_available():
        return "ninja is missing (pip install ninja)"
    return None


def kernel_available(device: torch.device | str) -> bool:
    """True when `device` is a CUDA/ROCm GPU and the toolchain to build the kernel is present."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return toolchain_problem() is None


def _key_lines(log: str, limit: int = 25) -> str:
    """The lines of a build log that say what went wrong (else its tail)."""
    lines = [ln for ln in log.splitlines() if ln.strip()]
    marks = ("error", "fatal", "undefined", "not found", "no such file", "cannot")
    hits = [ln for ln in lines if any(m in ln.lower() for m in marks)]
    return "\n".join((hits or lines)[-limit:])


def _build(head_size: int, verbose: bool) -> KernelOps:
    from torch.utils import cpp_extension

    hip = bool(torch.version.hip)
    problem = toolchain_problem()
    if problem is not None:
        raise RuntimeError(f"WKV7 kernel: cannot build, {problem}. {FALLBACK_HINT}")
    defines = [f"-D_N_={head_size}", f"-D_CHUNK_LEN_={CHUNK_LEN}"]
    name = f"wkv7_n{head_size}_c{CHUNK_LEN}"
    try:
        cpp_extension.load(
            name=name,
            sources=[str(CUDA_DIR / "wkv7_op.cpp"), str(CUDA_DIR / "wkv7_cuda.cu")],
            extra_cflags=["-O3", *defines],
            extra_cuda_cflags=[*(_HIPCC_FLAGS if hip else _NVCC_FLAGS), *defines],
            is_python_module=False,  # a plain library whose TORCH_LIBRARY block registers torch.ops.<name>
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
        raise RuntimeError(
            f"WKV7 kernel: building the {'HIP' if hip else 'CUDA'} extension for head size {head_size} "
            f"from {CUDA_DIR} failed. Key lines of the build log:\n{_key_lines(str(e))}\n{FALLBACK_HINT}"
        ) from e
    ops = getattr(torch.ops, name)
    built = list(ops.build_config())
    if built != [head_size, CHUNK_LEN]:
        raise RuntimeError(f"WKV7 kernel: the library loaded as {name} was built for (head size, chunk) = "
                           f"{tuple(built)}; delete its folder under ~/.cache/torch_extensions and rerun")
    return ops


def load_kernel(head_size: int, verbose: bool = False) -> KernelOps:
    """The kernel's operators for `head_size` (torch.ops.wkv7_n<N>_c16), built on first use and
    cached for the process.

    verbose=True shows the build (with nvcc's register/spill report from -res-usage)."""
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(
            f"WKV7 kernel: head size {head_size} is not supported (supported: {SUPPORTED_HEAD_SIZES}); "
            f"choose --head_size among them. {FALLBACK_HINT}"
        )
    with _lock:
        if head_size in _loaded:
            return _loaded[head_size]
        if head_size in _build_errors:  # do not rebuild a failed build on every call
            raise RuntimeError(_build_errors[head_size])
        try:
            ops = _build(head_size, verbose)
        except RuntimeError as e:
            _build_errors[head_size] = str(e)
            raise
        _loaded[head_size] = ops
        return ops


def _state_arg(x: torch.Tensor) -> torch.Tensor:
    """An fp32 (B,H,N,N) state as the kernel reads it: contiguous and 16-byte aligned (float4)."""
    x = x.float().contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _stream(device: torch.device) -> int:
    # The raw cudaStream_t / hipStream_t of the current stream, so the kernel runs where torch
    # expects it (also inside autograd's backward, which sets the forward's stream).
    return torch.cuda.current_stream(device).cuda_stream


class WKV7Kernel(torch.autograd.Function):
    """Autograd wrapper: forward saves the inputs, the stored chunk states and sa for backward."""

    @staticmethod
    def forward(ctx: Any, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # (B,T,H,N) x6, (B,H,N,N) fp32 or None
        ops = load_kernel(r.shape[-1])
        y, state_out, chunks, sa = ops.forward(r, w, k, v, a, b, state, _stream(r.device))
        ctx.save_for_backward(r, w, k, v, a, b, chunks, sa)
        ctx.has_state = state is not None
        ctx.set_materialize_grads(False)  # an unused y or state_out arrives as None
        return y, state_out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None,
                 dstate: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        r, w, k, v, a, b, chunks, sa = ctx.saved_tensors
        ops = load_kernel(r.shape[-1])
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()  # (B,T,H,N)
        if dstate is not None:
            dstate = _state_arg(dstate)  # (B,H,N,N)
        want_ds0 = ctx.has_state and ctx.needs_input_grad[6]
        grads = ops.backward(r, w, k, v, a, b, dy, chunks, sa, dstate, want_ds0, _stream(r.device))
        return (*grads[:6], grads[6] if want_ds0 else None)


def kernel_applicable(r: torch.Tensor) -> bool:
    """True when the kernel can run on inputs shaped and placed like `r` (B,T,H,N) (no build).

    The dispatcher's "auto" uses it; the other inputs are cast to r's dtype there.
    """
    if r.dim() != 4 or not kernel_available(r.device):
        return False
    T, N = r.shape[1], r.shape[3]
    return r.dtype in SUPPORTED_DTYPES and N in SUPPORTED_HEAD_SIZES and T > 0 and T % CHUNK_LEN == 0


def require_kernel(device: torch.device, dtype: torch.dtype, head_size: int) -> None:
    """Build (or fetch) the kernel for `head_size`, or raise saying why it cannot run on `device`
    with `dtype`: for callers that ask for the kernel explicitly (impl="cuda")."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"WKV7 kernel: needs a CUDA/ROCm device, got {device}. {FALLBACK_HINT}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"WKV7 kernel: dtype {dtype} is not supported; {DTYPE_HINT}")
    load_kernel(head_size)


def _check(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
           b: torch.Tensor, state: torch.Tensor | None) -> None:
    """Raise a clear error for inputs the kernel cannot take. The device is checked last, so that
    every other message can be exercised (and read) on a CPU."""
    names = ("r", "w", "k", "v", "a", "b")
    tensors = (r, w, k, v, a, b)
    for name, x in zip(names, tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"WKV7 kernel: {name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in zip(names, tensors):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"WKV7 kernel: {name} has dtype {x.dtype}; {DTYPE_HINT}")
        if x.dtype != r.dtype:
            raise TypeError(f"WKV7 kernel: {name} has dtype {x.dtype} but r has {r.dtype}; cast all six inputs to one dtype")
        if x.dim() != 4 or x.shape != r.shape:
            raise ValueError(
                f"WKV7 kernel: {name} has shape {tuple(x.shape)}; all six inputs must be (B,T,H,N) "
                f"of one shape, r is {tuple(r.shape)}"
            )
        if not x.is_contiguous():
            raise ValueError(f"WKV7 kernel: {name} is not contiguous; pass {name}.contiguous()")
    B, T, H, N = r.shape
    if N not in SUPPORTED_HEAD_SIZES:
        raise ValueError(
            f"WKV7 kernel: head size N={N} is not supported (supported: {SUPPORTED_HEAD_SIZES}); "
            f"choose --head_size among them. {FALLBACK_HINT}"
        )
    if T == 0 or T % CHUNK_LEN != 0:
        raise ValueError(
            f"WKV7 kernel: T={T} is not a positive multiple of {CHUNK_LEN}; pad the sequence or choose "
            f'ctx_len a multiple of {CHUNK_LEN}, or use impl="torch" (--wkv_impl torch)'
        )
    if state is not None:
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"WKV7 kernel: state must be a torch.Tensor or None, got {type(state).__name__}")
        if state.shape != (B, H, N, N):
            raise ValueError(f"WKV7 kernel: state has shape {tuple(state.shape)}, expected (B,H,N,N) = {(B, H, N, N)}")
        if state.dtype != torch.float32:
            raise TypeError(f"WKV7 kernel: state has dtype {state.dtype}; pass state.float() (the state is fp32)")
    for name, x in zip((*names, "state"), (*tensors, state)):
        if x is None:
            continue
        if x.device.type != "cuda":
            raise ValueError(f"WKV7 kernel: {name} is on {x.device}; the kernel needs CUDA/ROCm tensors. {FALLBACK_HINT}")
        if x.device != r.device:
            raise ValueError(f"WKV7 kernel: {name} is on {x.device} but r is on {r.device}; put all tensors on one device")


def wkv7_kernel(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV7 on the GPU kernel: (B,T,H,N) inputs -> (y (B,T,H,N) input dtype, state_out (B,H,N,N) fp32).

    w is SPEC step 4's value (decay d = exp(-exp(w))); state None means zeros.
    """
    _check(r, w, k, v, a, b, state)
    if state is not None:
        state = _state_arg(state)
    return WKV7Kernel.apply(r, w, k, v, a, b, state)
