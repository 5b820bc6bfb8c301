"""WKV7, the RWKV-7 state recurrence, behind one function that picks the implementation.

    y, state_out = wkv7(r, w, k, v, a, b, state=None, impl="auto")

All six inputs are (B,T,H,N) with the same dtype and device; w is the model's log-log decay (SPEC step 4),
d = exp(-exp(w)); a and b are the model's a_in = -kk and b_in = kk * a. state is the (B,H,N,N) float32
state entering the sequence (rows = value index, columns = key index), None meaning zeros.
Returns y (B,T,H,N) in the input dtype and the final state (B,H,N,N), float32 (float64 for float64
inputs on the PyTorch path).

impl:
  "auto"  - the compiled CUDA/HIP kernel when the tensors are on a GPU and the kernel applies
            (T a multiple of 16, a supported head size), else the chunked PyTorch path;
  "cuda"  - the kernel, or a clear error saying why it cannot run (also on ROCm: same sources, HIP build);
  "torch" - the chunked PyTorch path on any device (the fallback when the kernel cannot be built).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .torch_impl import wkv7_chunked

IMPLS = ("auto", "cuda", "torch")


def _check_inputs(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                  state: Tensor | None) -> None:
    if r.dim() != 4:
        raise ValueError(f"wkv7: r must be (B,T,H,N), got shape {tuple(r.shape)}")
    for name, t in zip("wkvab", (w, k, v, a, b)):
        if t.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(t.shape)} but r has {tuple(r.shape)}; "
                             "all six inputs must be (B,T,H,N) of the same shape")
        if t.device != r.device:
            raise ValueError(f"wkv7: {name} is on {t.device} but r is on {r.device}; move them together")
    if not r.is_floating_point():
        raise TypeError(f"wkv7: inputs must be floating point, got {r.dtype}")
    if state is not None:
        B, _, H, N = r.shape
        if tuple(state.shape) != (B, H, N, N):
            raise ValueError(f"wkv7: state has shape {tuple(state.shape)}, expected (B,H,N,N) = {(B, H, N, N)}")
        if state.device != r.device:
            raise ValueError(f"wkv7: state is on {state.device} but the inputs are on {r.device}")


# Never traced by torch.compile (train.py --compile 1 compiles the code around it, and this keeps a
# whole-model torch.compile from tracing it too): the kernel is opaque to it; the chunked path's
# hand-written backward leaves little for it to fuse (no faster compiled on CPU), and inductor's CPU
# backward of that path's float32 island inside bf16 autocast once gave NaN gradients (torch 2.13).
@torch.compiler.disable
def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
         state: Tensor | None = None, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Run WKV7; see the module docstring for shapes, dtypes and `impl`."""
    if impl not in IMPLS:
        raise ValueError(f"wkv7: impl={impl!r} is not one of {IMPLS}")
    _check_inputs(r, w, k, v, a, b, state)
    if impl == "torch" or (impl == "auto" and r.device.type != "cuda"):
        return wkv7_chunked(r, w, k, v, a, b, state)
    # Imported here so that CPU-only use never touches the kernel module (no build at import).
    from .kernel import kernel_applicable, wkv7_kernel
    if impl == "auto" and not kernel_applicable(r):
        return wkv7_chunked(r, w, k, v, a, b, state)
    # The kernel takes one element type for all six inputs; under autocast w can arrive as float32
    # while r is bf16, so follow r (as the reference implementation did).
    w, k, v, a, b = (t.to(r.dtype) for t in (w, k, v, a, b))
    return wkv7_kernel(r, w, k, v, a, b, state)
