"""WKV7 backstepping kernel (cuda/wkv7_cuda.cu, src/wkv7/kernel.py).

Without a GPU the kernel is checked three ways:
1. `emulate_forward` / `emulate_backward` below replay the kernel's algorithm in float64 (per-thread
   rows and columns, chunk checkpoints in the transposed layout, the per-step sa buffer, the
   backward's exact backstepping, both copies of dS, the reloads at chunk boundaries, state in and
   out) and must equal torch autograd through the sequential reference to ~1e-10.
2. tests/wkv7_cpu_harness.cpp compiles the real kernel code with g++ and runs it with one host
   thread per CUDA thread (std::barrier for __syncthreads): the real indexing, layouts, barriers,
   bf16/fp16/fp32 conversions, in fp32 arithmetic, against the float64 reference.
3. nvcc compiles the .cu (all element types) with kernel.py's flags, g++ compiles the torch binding
   without CUDA headers, the two link into a library that registers its torch.ops operators when
   loaded, whose C++ input checks are exercised on CPU tensors, and torch's hipify turns the .cu
   into HIP-only source.
GPU tests (marked gpu) build the extension through kernel.py and compare it, through autograd, with
the float64 reference (bf16, fp16, fp32; state in and out).
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from src.wkv7 import kernel as K
from src.wkv7.reference import wkv7_sequential

REPO = Path(__file__).resolve().parents[1]
CU = REPO / "cuda" / "wkv7_cuda.cu"
OP = REPO / "cuda" / "wkv7_op.cpp"
HARNESS = Path(__file__).resolve().parent / "wkv7_cpu_harness.cpp"
D_MIN = math.exp(-math.exp(-0.5))  # smallest decay the model produces (~0.545)
CHUNK = K.CHUNK_LEN
GRAD_NAMES = ("r", "w", "k", "v", "a", "b", "state")


# ----------------------------------------------------------------------------------------------
# inputs and reference


def make_inputs(B: int, T: int, H: int, N: int, seed: int, d_lo: float = D_MIN, d_hi: float = 1 - 1e-4,
                dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Model-like fresh inputs (a = -kk, b = kk * rate); decays uniform in [d_lo, d_hi] (the two
    ends included), plus a random initial state and random output/state gradients."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    d = d_lo + (d_hi - d_lo) * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    d.view(-1)[0], d.view(-1)[-1] = d_lo, d_hi
    kk = F.normalize(rnd(B, T, H, N), dim=-1)
    out = {
        "r": rnd(B, T, H, N),
        "w": torch.log(-torch.log(d)),  # exp(-exp(w)) = d
        "k": rnd(B, T, H, N) * 0.5,
        "v": rnd(B, T, H, N),
        "a": -kk,
        "b": kk * torch.rand(B, T, H, N, generator=g, dtype=torch.float64),
        "s0": rnd(B, H, N, N) * 0.5,
        "dy": rnd(B, T, H, N),
        "dsT": rnd(B, H, N, N),
    }
    return {key: x.to(dtype) for key, x in out.items()}


def reference(x: dict[str, torch.Tensor], with_state: bool = True):
    """float64 y, final state and the gradients of sum(y*dy) + sum(sT*dsT) via autograd."""
    leaves = [x[n].double().clone().requires_grad_() for n in ("r", "w", "k", "v", "a", "b")]
    s0 = x["s0"].double().clone().requires_grad_() if with_state else None
    y, sT = wkv7_sequential(*leaves, state=s0)
    ((y * x["dy"].double()).sum() + (sT * x["dsT"].double()).sum()).backward()
    grads = [t.grad for t in leaves] + [s0.grad if with_state else None]
    return y.detach(), sT.detach(), grads


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: one number per tensor, robust to elements near zero."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------
# 1. float64 emulation of the kernel's algorithm


def emulate_forward(r, w, k, v, a, b, s0, chunk=CHUNK):
    """The forward kernel, all (batch, head) blocks at once; thread i's row is S[..., i, :]."""
    B, T, H, N = r.shape
    S = s0.clone() if s0 is not None else r.new_zeros(B, H, N, N)  # (B,H,N,N) rows = threads
    y = torch.empty_like(r)
    sa_buf = torch.empty_like(r)
    chunks = r.new_zeros(B, H, T // chunk, N, N)
    for t in range(T):
        d = torch.exp(-torch.exp(w[:, t]))  # (B,H,N) in shared memory
        sa = (S * a[:, t, :, None, :]).sum(-1)  # thread i: sum_j S[i,j] a_j
        S = S * d[:, :, None, :] + sa[..., None] * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        y[:, t] = (S * r[:, t, :, None, :]).sum(-1)
        sa_buf[:, t] = sa
        if (t + 1) % chunk == 0:
            chunks[:, :, t // chunk] = S.transpose(-1, -2)  # stored [j][i] = S[i][j]
    return y, S, chunks, sa_buf


def emulate_backward(r, w, k, v, a, b, dy, chunks, sa_buf, dsT, chunk=CHUNK):
    """The backward kernel: thread c holds s_col[c, m] = S[m][c], dsc[c, m] = dS[m][c] and the row
    copy dsr[c, m] = dS[c][m]; it walks t downwards, reloading S_t from `chunks` at chunk ends and
    backstepping S_{t-1} = (S_t - v k^T - sa b^T) / d in between."""
    B, T, H, N = r.shape
    grads = {n: torch.empty_like(r) for n in ("r", "w", "k", "v", "a", "b")}
    dsc = dsT.transpose(-1, -2).clone() if dsT is not None else r.new_zeros(B, H, N, N)
    dsr = dsT.clone() if dsT is not None else r.new_zeros(B, H, N, N)
    s_col = r.new_zeros(B, H, N, N)
    for t in range(T - 1, -1, -1):
        rt, kt, vt, at, bt, dyt, sat = (x[:, t] for x in (r, k, v, a, b, dy, sa_buf))  # (B,H,N)
        wfac = -torch.exp(w[:, t])
        d = torch.exp(wfac)
        if (t + 1) % chunk == 0:
            s_col = chunks[:, :, t // chunk].clone()  # thread c reads its stored row = column c of S
        col = lambda x: x[..., :, None]  # thread's own value (index c)
        shared = lambda x: x[..., None, :]  # value of every thread (index m), from shared memory
        dr = (s_col * shared(dyt)).sum(-1)
        s_col = (s_col - shared(vt) * col(kt) - shared(sat) * col(bt)) / col(d)
        dsc = dsc + shared(dyt) * col(rt)
        dsr = dsr + col(dyt) * shared(rt)
        dv = (dsr * shared(kt)).sum(-1)
        dsa = (dsr * shared(bt)).sum(-1)  # -> shared memory, barrier
        dk = (dsc * shared(vt)).sum(-1)
        db = (dsc * shared(sat)).sum(-1)
        dd = (dsc * s_col).sum(-1)
        da = (s_col * shared(dsa)).sum(-1)
        dsc = dsc * col(d) + shared(dsa) * col(at)
        dsr = dsr * shared(d) + col(dsa) * shared(at)
        for name, g in zip(("r", "w", "k", "v", "a", "b"), (dr, dd * d * wfac, dk, dv, da, db)):
            grads[name][:, t] = g
    return grads, dsc.transpose(-1, -2), dsr


@pytest.mark.parametrize("T,with_state", [(16, True), (48, True), (32, False)])
def test_emulated_algorithm_matches_autograd_float64(T: int, with_state: bool) -> None:
    x = make_inputs(2, T, 2, 8, seed=T)
    s0 = x["s0"] if with_state else None
    y, sT, chunks, sa_buf = emulate_forward(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], s0)
    grads, ds0, ds0_rows = emulate_backward(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], x["dy"],
                                            chunks, sa_buf, x["dsT"])
    y_ref, sT_ref, g_ref = reference(x, with_state)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(sT, sT_ref) < 1e-12
    for name in GRAD_NAMES[:6]:
        assert rel_err(grads[name], g_ref[GRAD_NAMES.index(name)]) < 1e-9, name
    if with_state:
        assert rel_err(ds0, g_ref[6]) < 1e-9
    assert rel_err(ds0_rows, ds0) < 1e-12  # both dS copies carry the same matrix


def test_emulated_buffers_hold_the_states() -> None:
    """Chunk checkpoints are S_t at t = 15, 31, ... in the [j][i] layout; sa_t = S_{t-1} a_t."""
    x = make_inputs(1, 32, 2, 8, seed=5)
    _, _, chunks, sa_buf = emulate_forward(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], x["s0"])
    S = x["s0"].clone()
    for t in range(32):
        sa = (S @ x["a"][:, t, :, :, None])[..., 0]
        assert torch.allclose(sa_buf[:, t], sa, atol=1e-12)
        _, S = wkv7_sequential(*(x[n][:, t:t + 1] for n in ("r", "w", "k", "v", "a", "b")), state=S)
        if (t + 1) % CHUNK == 0:
            assert torch.allclose(chunks[:, :, t // CHUNK].transpose(-1, -2), S, atol=1e-12)


def test_emulation_detects_a_wrong_gradient_term() -> None:
    """Guard for the test above: dropping the dsa*a term of the dS update must break ds0."""
    x = make_inputs(1, 16, 1, 8, seed=9)
    y, sT, chunks, sa_buf = emulate_forward(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], x["s0"])
    _, _, g_ref = reference(x)
    grads, ds0, _ = emulate_backward(x["r"], x["w"], x["k"], x["v"], x["a"] * 0, x["b"], x["dy"],
                                     chunks, sa_buf, x["dsT"])  # a = 0 only in the dS recursion
    assert rel_err(ds0, g_ref[6]) > 1e-3


# ----------------------------------------------------------------------------------------------
# 2. the real kernel code on the CPU (g++ harness)

def _find_cuda_home() -> Path | None:
    """The CUDA toolkit (headers for the harness, libcudart for the binding), if installed."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  Path(nvcc).resolve().parents[1] if nvcc else None]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").exists():
            return Path(c)
    return None


CUDA_HOME = _find_cuda_home()
HAVE_HARNESS_TOOLS = shutil.which("g++") is not None and CUDA_HOME is not None
DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """ctypes handles to the harness built for N = 16 and N = 64 (built once per test module)."""
    if not HAVE_HARNESS_TOOLS:
        pytest.skip("needs g++ and the CUDA toolkit headers (cuda_bf16.h)")
    out = {}
    for n in (16, 64):
        so = tmp_path_factory.mktemp("wkv7_harness") / f"wkv7_cpu_n{n}.so"
        cmd = ["g++", "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-fno-gnu-unique",
               f"-I{CUDA_HOME / 'include'}", f"-D_N_={n}", f"-D_CHUNK_LEN_={CHUNK}", str(HARNESS), "-o", str(so)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        lib = ctypes.CDLL(str(so))
        assert lib.wkv7_cpu_head_size() == n
        out[n] = lib
    return out


def run_harness(lib, x: dict[str, torch.Tensor], dtype: torch.dtype, with_state: bool = True):
    """Forward + backward of the real kernels on the CPU; returns what the extension returns."""
    B, T, H, N = x["r"].shape
    ins = [x[n].to(dtype).contiguous() for n in ("r", "w", "k", "v", "a", "b")]
    dy = x["dy"].to(dtype).contiguous()
    s0 = x["s0"].float().contiguous() if with_state else None
    dsT = x["dsT"].float().contiguous()
    y = torch.empty_like(ins[0])
    sT = torch.empty(B, H, N, N)
    chunks = torch.full((B, H, T // CHUNK, N, N), float("nan"))
    sa = torch.full((B, T, H, N), float("nan"))
    ptr = lambda t: ctypes.c_void_p(t.data_ptr() if t is not None else None)
    code = DTYPE_CODE[dtype]
    assert lib.wkv7_cpu_forward(code, B, T, H, *map(ptr, ins), ptr(s0), ptr(y), ptr(chunks), ptr(sa), ptr(sT)) == 0
    grads = [torch.full_like(ins[0], float("nan")) for _ in range(6)]
    ds0 = torch.full((B, H, N, N), float("nan"))
    assert lib.wkv7_cpu_backward(code, B, T, H, *map(ptr, ins), ptr(dy), ptr(chunks), ptr(sa), ptr(dsT),
                                 *map(ptr, grads), ptr(ds0)) == 0
    return y, sT, chunks, sa, grads + [ds0]


def rounded(x: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The inputs as the kernel sees them (rounded to dtype), so the reference uses the same values."""
    out = {n: x[n].to(dtype).double() for n in ("r", "w", "k", "v", "a", "b", "dy")}
    out["s0"], out["dsT"] = x["s0"].float().double(), x["dsT"].float().double()
    return out


@pytest.mark.parametrize("N,T,with_state", [(16, 48, True), (16, 32, False), (64, 32, True)])
def test_harness_fp32_matches_reference(harness, N: int, T: int, with_state: bool) -> None:
    x = make_inputs(2, T, 2, N, seed=100 + N + T)
    y, sT, chunks, sa, grads = run_harness(harness[N], x, torch.float32, with_state)
    xr = rounded(x, torch.float32)
    y_ref, sT_ref, g_ref = reference(xr, with_state)
    assert rel_err(y, y_ref) < 2e-5
    assert rel_err(sT, sT_ref) < 2e-5
    for name, g, gr in zip(GRAD_NAMES[:6], grads, g_ref):
        assert rel_err(g, gr) < 2e-4, name
    if with_state:
        assert rel_err(grads[6], g_ref[6]) < 2e-4
    # the stored buffers: chunk states [j][i] and sa_t = S_{t-1} a_t, as the emulation defines them
    _, _, chunks_ref, sa_ref = emulate_forward(*(xr[n] for n in ("r", "w", "k", "v", "a", "b")),
                                               xr["s0"] if with_state else None)
    assert rel_err(chunks, chunks_ref) < 2e-5
    assert rel_err(sa, sa_ref) < 2e-5


def test_harness_worst_case_decay_fp32(harness) -> None:
    """Every decay at the model's minimum 0.545: backstepping divides by d 16 times per chunk,
    the reload at each chunk end keeps the error bounded."""
    x = make_inputs(1, 64, 2, 64, seed=7, d_lo=D_MIN, d_hi=D_MIN)
    y, sT, _, _, grads = run_harness(harness[64], x, torch.float32)
    y_ref, sT_ref, g_ref = reference(rounded(x, torch.float32))
    assert rel_err(y, y_ref) < 2e-5
    for name, g, gr in zip(GRAD_NAMES, grads, g_ref):
        assert rel_err(g, gr) < 1e-3, name  # measured ~3e-4: (1/0.545)^15 amplifies fp32 rounding


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_harness_half_types(harness, dtype: torch.dtype, tol: float) -> None:
    x = make_inputs(1, 32, 2, 16, seed=11)
    y, sT, _, _, grads = run_harness(harness[16], x, dtype)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads[:6])
    y_ref, sT_ref, g_ref = reference(rounded(x, dtype))
    assert rel_err(y, y_ref) < tol
    assert rel_err(sT, sT_ref) < 1e-4  # the state stays fp32
    for name, g, gr in zip(GRAD_NAMES, grads, g_ref):
        assert rel_err(g, gr) < tol, name


class HarnessModule:
    """Stands in for the built extension (same forward/backward contract as cuda/wkv7_op.cpp),
    running the real kernels through the CPU harness: lets the autograd wiring of kernel.py run
    on a CPU."""

    def __init__(self, lib):
        self.lib = lib

    @staticmethod
    def _ptr(t):
        return ctypes.c_void_p(t.data_ptr() if t is not None else None)

    def forward(self, r, w, k, v, a, b, s0, stream):
        B, T, H, N = r.shape
        y = torch.empty_like(r)
        sT, chunks, sa = torch.empty(B, H, N, N), torch.empty(B, H, T // CHUNK, N, N), torch.empty(B, T, H, N)
        assert self.lib.wkv7_cpu_forward(DTYPE_CODE[r.dtype], B, T, H, *map(self._ptr, (r, w, k, v, a, b, s0, y, chunks, sa, sT))) == 0
        return [y, sT, chunks, sa]

    def backward(self, r, w, k, v, a, b, dy, chunks, sa, dsT, want_ds0, stream):
        B, T, H, N = r.shape
        for t in (r, w, k, v, a, b, dy, chunks, sa) + ((dsT,) if dsT is not None else ()):
            assert t.is_contiguous() and t.dtype in (r.dtype, torch.float32)
        grads = [torch.empty_like(r) for _ in range(6)]
        ds0 = torch.empty(B, H, N, N) if want_ds0 else None
        assert self.lib.wkv7_cpu_backward(DTYPE_CODE[r.dtype], B, T, H, *map(self._ptr, (r, w, k, v, a, b, dy, chunks, sa, dsT)),
                                          *map(self._ptr, grads), self._ptr(ds0)) == 0
        return grads + ([ds0] if want_ds0 else [])


@pytest.mark.parametrize("with_state,use_state_out", [(True, True), (True, False), (False, True)])
def test_autograd_wrapper_on_the_harness(harness, monkeypatch, with_state: bool, use_state_out: bool) -> None:
    """WKV7Kernel (what wkv7_kernel applies after its checks) with the harness as the module:
    forward outputs and every gradient through autograd, an unused final state (None gradient)
    and no initial state included."""
    monkeypatch.setattr(K, "load_kernel", lambda n: HarnessModule(harness[n]))
    monkeypatch.setattr(K, "_stream", lambda device: 0)
    x = make_inputs(1, 32, 2, 16, seed=31)
    if not use_state_out:
        x["dsT"] = torch.zeros_like(x["dsT"])
    leaves = [x[n].float().requires_grad_() for n in ("r", "w", "k", "v", "a", "b")]
    s0 = x["s0"].float().requires_grad_() if with_state else None
    y, sT = K.WKV7Kernel.apply(*leaves, s0)
    loss = (y * x["dy"].float()).sum() + ((sT * x["dsT"].float()).sum() if use_state_out else 0)
    loss.backward()
    y_ref, sT_ref, g_ref = reference(rounded(x, torch.float32), with_state)
    assert rel_err(y.detach(), y_ref) < 2e-5 and rel_err(sT.detach(), sT_ref) < 2e-5
    grads = [t.grad for t in leaves] + [s0.grad if with_state else None]
    for name, g, gr in zip(GRAD_NAMES, grads, g_ref):
        if gr is None:
            assert g is None
        else:
            assert rel_err(g, gr) < 2e-4, name


def test_harness_detects_wrong_inputs(harness) -> None:
    """Guard: the harness comparison fails when an input is swapped (k <-> v)."""
    x = make_inputs(1, 16, 1, 16, seed=3)
    y, _, _, _, _ = run_harness(harness[16], x, torch.float32)
    x["k"], x["v"] = x["v"], x["k"]
    y_ref, _, _ = reference(rounded(x, torch.float32))
    assert rel_err(y, y_ref) > 1e-2


# ----------------------------------------------------------------------------------------------
# 3. builds: nvcc on the .cu, g++ on the binding, symbols, hipify

NVCC = shutil.which("nvcc")
DEFINES = ["-D_N_=64", f"-D_CHUNK_LEN_={CHUNK}"]


@pytest.fixture(scope="module")
def cu_object(tmp_path_factory):
    """The .cu compiled by nvcc with torch's and the kernel's flags (kernel.py) for every GPU generation
    this nvcc supports (benchmarks.kernel_resources.NV_TARGETS: T4/RTX 20xx to RTX 50xx with CUDA 13)."""
    from benchmarks.kernel_resources import nv_archs, nvcc_command

    if NVCC is None:
        pytest.skip("nvcc not found")
    archs = nv_archs()
    assert {"80", "90"} <= set(archs), f"nvcc lists {archs}: CUDA 11.8 or later is needed for sm_90"
    obj = tmp_path_factory.mktemp("nvcc") / "wkv7_cuda.o"
    res = subprocess.run(nvcc_command(DEFINES, obj, archs), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return obj, res.stdout + res.stderr, archs


def test_nvcc_compiles_every_element_type(cu_object) -> None:
    _, log, archs = cu_object
    entries = re.findall(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", log)
    assert {a for _, a in entries} == set(archs)
    for arch in archs:
        names = [n for n, a in entries if a == arch]
        for kern in ("forward_kernel", "backward_kernel"):
            for elem in ("13__nv_bfloat16", "6__half", "f"):
                assert any(f"{kern}I{elem}E" in n for n in names), (kern, elem, arch)
    # the forward keeps its row of the state in registers: no local-memory spills there
    fwd = re.findall(r"Function properties for \S*forward_kernel\S*\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    assert fwd and all(s == "0" for _, s in fwd), fwd


@pytest.fixture(scope="module")
def op_object(tmp_path_factory) -> Path:
    """cuda/wkv7_op.cpp compiled by g++ against the torch headers only (it includes no CUDA/HIP header)."""
    from torch.utils.cpp_extension import include_paths

    if shutil.which("g++") is None or shutil.which("nm") is None:
        pytest.skip("needs g++ and nm")
    obj = tmp_path_factory.mktemp("op") / "wkv7_op.o"
    incs = [f"-I{p}" for p in include_paths()]
    cmd = ["g++", "-c", "-O0", "-std=c++20", "-fPIC", *DEFINES, "-DTORCH_EXTENSION_NAME=wkv7_test",
           *incs, str(OP), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return obj


def _launchers_wanted(op_obj: Path) -> set[str]:
    """The (mangled) launcher symbols the binding object calls."""
    undefined = subprocess.run(["nm", "-u", str(op_obj)], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"(\S*wkv7_\w+_launch\S*)", undefined))


def _assert_defines(obj: Path, symbols: set[str]) -> None:
    defined = subprocess.run(["nm", "--defined-only", str(obj)], capture_output=True, text=True, check=True).stdout
    for sym in symbols:
        assert re.search(rf"\sT {re.escape(sym)}$", defined, re.M), f"{sym} not defined by {obj.name}"


@pytest.fixture(scope="module")
def binding(cu_object, op_object, tmp_path_factory):
    """The torch binding compiled with g++ against the torch headers only (no CUDA headers), linked
    with the nvcc object into a library and loaded the way kernel.py's build is (torch.ops.load_library,
    whose TORCH_LIBRARY block registers the operators); no GPU needed for that."""
    if CUDA_HOME is None:
        pytest.skip("needs the CUDA runtime library")
    obj = op_object
    so = tmp_path_factory.mktemp("binding") / "wkv7_test.so"
    torch_lib = Path(torch.__file__).parent / "lib"
    cudart = CUDA_HOME / "lib64"
    cmd = ["g++", "-shared", str(obj), str(cu_object[0]), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch",
           f"-L{cudart}", "-lcudart", f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{cudart}", "-o", str(so)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    torch.ops.load_library(str(so))
    return obj, torch.ops.wkv7_test


def test_binding_calls_the_launchers_it_links(binding, cu_object) -> None:
    """Every launcher the binding calls is defined by the nvcc object with the same (mangled)
    signature, the linked library loads (all symbols resolve) and registers its operators."""
    obj, ops = binding
    wanted = _launchers_wanted(obj)
    assert len(wanted) == 2, wanted
    _assert_defines(cu_object[0], wanted)
    assert list(ops.build_config()) == [64, CHUNK]
    schema = str(ops.forward.default._schema)
    assert "Tensor? s0" in schema and "-> Tensor[]" in schema, schema


@pytest.mark.parametrize("change,needle", [
    (lambda ins: ins.__setitem__(1, ins[1].float()), "w has dtype Float but r has BFloat16"),
    (lambda ins: ins.__setitem__(slice(None), [t.double() for t in ins]), "cast r, w, k, v, a, b to bfloat16, float16 or float32"),
    (lambda ins: ins.__setitem__(2, ins[2][:, :16]), "k has shape [1, 16, 2, 64] but r has [1, 32, 2, 64]"),
    (lambda ins: ins.__setitem__(3, ins[3].transpose(1, 2).contiguous().transpose(1, 2)), "v is not contiguous"),
    (lambda ins: ins.__setitem__(slice(None), _cpu_inputs(T=20)), "T = 20 is not a multiple of 16"),
    (lambda ins: ins.__setitem__(slice(None), _cpu_inputs(N=32)), "this build is for head size N = 64, got N = 32"),
    (lambda ins: ins.append(torch.zeros(1, 2, 64, 64, dtype=torch.float64)), "state must be float32"),
    (lambda ins: ins.append(torch.zeros(1, 2, 64, 32)), "state must have shape (B,H,N,N) = (1,2,64,64)"),
    (lambda ins: ins.append(torch.zeros(2 * 64 * 64 + 1)[1:].view(1, 2, 64, 64)), "state is not 16-byte aligned"),
    (lambda ins: None, "r is on cpu; move r, w, k, v, a, b and the state to the GPU"),
])
def test_binding_rejects_bad_input(binding, change, needle) -> None:
    """The C++ checks (behind kernel.py's) say what to change, as a Python RuntimeError through torch's
    operator call path; CPU tensors reach all but the last."""
    _, ops = binding
    ins = _cpu_inputs()
    change(ins)
    state = ins.pop() if len(ins) == 7 else None
    with pytest.raises(RuntimeError) as e:
        ops.forward(*ins, state, 0)
    assert needle in str(e.value)


def test_binding_backward_checks_its_buffers(binding) -> None:
    _, ops = binding
    ins = _cpu_inputs()
    dy = torch.zeros_like(ins[0])
    chunks = torch.zeros(1, 2, 32 // CHUNK + 1, 64, 64)       # one chunk too many
    sa = torch.zeros(ins[0].shape)
    with pytest.raises(RuntimeError, match="backward got chunk states of shape"):
        ops.backward(*ins, dy, chunks, sa, None, False, 0)


@pytest.fixture(scope="module")
def hipified(tmp_path_factory) -> tuple[Path, Path]:
    """(kernel .hip, binding .cpp) as torch.utils.cpp_extension.load writes them on ROCm: it runs
    this hipify on the sources before compiling them with hipcc."""
    from benchmarks.kernel_resources import hipify

    return tuple(hipify([CU, OP], tmp_path_factory.mktemp("hipify")))


def test_hipify_converts_the_kernel(hipified) -> None:
    """ROCm: the hipified sources must use HIP names only (one source of truth for CUDA and HIP)."""
    hip_cu, hip_op = hipified
    assert hip_cu.suffix == ".hip" and hip_cu.exists()
    text = re.sub(r"//[^\n]*", "", hip_cu.read_text())  # code only
    for cuda_name in ("cuda_bf16.h", "cuda_fp16.h", "cuda_runtime.h", "__nv_bfloat16", "cudaStream_t",
                      "cudaGetLastError", "cudaSuccess", "cudaGetErrorString", "<<<"):
        assert cuda_name not in text, cuda_name
    for hip_name in ("hip/hip_bf16.h", "hip/hip_fp16.h", "__hip_bfloat16", "hipStream_t", "hipLaunchKernelGGL"):
        assert hip_name in text, hip_name
    # hipcc, unlike nvcc, needs the runtime header before the first kernel
    assert 0 <= text.find("#include <hip/hip_runtime.h>") < text.find("__global__")
    # the binding has no CUDA names in its code: hipify leaves the code as it is
    code = lambda t: [ln for ln in re.sub(r"//[^\n]*", "", t).splitlines() if ln.strip()]
    assert code(hip_op.read_text()) == code(OP.read_text())


@pytest.mark.skipif(shutil.which("hipcc") is None,
                    reason="hipcc not found (Debian/Ubuntu: apt-get install hipcc libamdhip64-dev rocm-device-libs)")
def test_hipcc_compiles_the_hipified_kernel(hipified, op_object, tmp_path) -> None:
    """The hipified kernel builds with a real HIP compiler, with the flags torch's ROCm build adds and
    kernel.py's hipcc flags, for a 64-wide (gfx90a) and a 32-wide (gfx1030: a block is 2 waves) AMD
    GPU: every kernel for every element type, host launchers with the signatures the binding calls,
    and a forward that keeps its state row in registers (no scratch), as on NVIDIA.
    benchmarks/kernel_resources.py tabulates the same remarks."""
    from benchmarks.kernel_resources import (AMD_ARCHS, hip_compat_flags, hip_header_found, hip_remarks, hipcc,
                                             hipcc_command)

    hip_cu, _ = hipified
    if not hip_header_found("hip/hip_runtime.h", tmp_path):
        pytest.skip("hipcc cannot compile HIP code here (no HIP runtime headers)")
    obj = tmp_path / "wkv7_hip.o"
    res = hipcc(hipcc_command(hip_cu, DEFINES, AMD_ARCHS, hip_compat_flags(tmp_path), obj))
    assert res.returncode == 0, res.stderr[-4000:]

    kernels = hip_remarks(res.stderr)
    for kern in ("forward_kernel", "backward_kernel"):
        for elem in ("14__hip_bfloat16", "6__half", "f"):
            found = [k for k in kernels if f"{kern}I{elem}E" in k["name"]]
            assert len(found) == len(AMD_ARCHS), (kern, elem, [k["name"] for k in kernels])
    forwards = [k for k in kernels if "forward_kernel" in k["name"]]
    assert forwards and all(k["ScratchSize"] == "0" and k["VGPRs Spill"] == "0" for k in forwards), forwards

    wanted = _launchers_wanted(op_object)
    assert len(wanted) == 2, wanted
    _assert_defines(obj, wanted)


# ----------------------------------------------------------------------------------------------
# 4. src/wkv7/kernel.py on the CPU: validation messages, availability, build errors


def _cpu_inputs(T: int = 32, N: int = 64, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    return [torch.zeros(1, T, 2, N, dtype=dtype) for _ in range(6)]


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda ins: ins.__setitem__(1, ins[1].float()), TypeError, "w has dtype torch.float32 but r has torch.bfloat16"),
    (lambda ins: ins.__setitem__(slice(None), [t.double() for t in ins]), TypeError, "use bfloat16, float16 or float32"),
    (lambda ins: ins.__setitem__(2, ins[2][:, :16]), ValueError, "k has shape (1, 16, 2, 64)"),
    (lambda ins: ins.__setitem__(3, ins[3].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "v is not contiguous"),
    (lambda ins: ins.__setitem__(slice(None), _cpu_inputs(T=20)), ValueError, "T=20 is not a positive multiple of 16"),
    (lambda ins: ins.__setitem__(slice(None), _cpu_inputs(N=48)), ValueError, "head size N=48 is not supported"),
    (lambda ins: None, ValueError, "the kernel needs CUDA/ROCm tensors"),
])
def test_input_validation_messages(mutate, exc, needle) -> None:
    ins = _cpu_inputs()
    mutate(ins)
    with pytest.raises(exc) as e:
        K.wkv7_kernel(*ins)
    assert needle in str(e.value)


def test_state_validation_messages() -> None:
    ins = _cpu_inputs()
    with pytest.raises(ValueError, match=r"state has shape \(1, 2, 64, 32\), expected \(B,H,N,N\)"):
        K.wkv7_kernel(*ins, state=torch.zeros(1, 2, 64, 32))
    with pytest.raises(TypeError, match="pass state.float()"):
        K.wkv7_kernel(*ins, state=torch.zeros(1, 2, 64, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="--wkv_impl torch"):  # CPU tensors, state fine
        K.wkv7_kernel(*ins, state=torch.zeros(1, 2, 64, 64))


def test_no_kernel_on_cpu() -> None:
    assert not K.kernel_available("cpu")
    assert not K.kernel_applicable(torch.zeros(1, 16, 1, 64))
    with pytest.raises(ValueError, match="head size 48 is not supported"):
        K.load_kernel(48)


def test_toolchain_is_probed_once_per_process(monkeypatch) -> None:
    """The dispatcher asks kernel_applicable for every layer of every step; the toolchain probe
    (a `ninja --version` subprocess) must run once, not per call (it cost ~1.5 ms a layer)."""
    from torch.utils import cpp_extension

    probes = []
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: probes.append(1) or True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/opt/cuda")
    monkeypatch.setattr(cpp_extension, "ROCM_HOME", "/opt/rocm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    K.toolchain_problem.cache_clear()
    try:
        r = torch.empty(1, 32, 2, 64, device="meta")
        assert not K.kernel_applicable(r)        # a meta tensor is not on a GPU: no probe
        assert probes == []
        for _ in range(50):
            assert K.kernel_available("cuda:0")
        assert probes == [1]
    finally:
        K.toolchain_problem.cache_clear()       # later tests see the real toolchain again


@pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None, reason="torch has a GPU toolkit")
def test_build_without_toolkit_says_how_to_fall_back() -> None:
    with pytest.raises(RuntimeError) as e:
        K.load_kernel(64)
    assert "nvcc" in str(e.value) and "--wkv_impl torch" in str(e.value) and 'impl="torch"' in str(e.value)


@pytest.mark.parametrize("hip", [False, True])
def test_build_passes_the_spec_flags_to_cpp_extension_load(monkeypatch, hip: bool) -> None:
    """SPEC 2: nvcc gets -res-usage --use_fast_math -O3 -Xptxas -O3 --extra-device-vectorization plus the
    head size and chunk length as -D macros; hipcc gets no nvcc-only flag. cpp_extension.load is replaced
    by a stub that records its arguments (no toolchain needed)."""
    from torch.utils import cpp_extension

    calls: list[dict] = []

    def fake_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("stub: not building")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(K, "toolchain_problem", lambda: None)
    monkeypatch.setattr(K, "_build_errors", {})
    monkeypatch.setattr(K, "_loaded", {})
    monkeypatch.setattr(torch.version, "hip", "6.2" if hip else None)
    with pytest.raises(RuntimeError, match="stub: not building"):
        K.load_kernel(32)
    (call,) = calls
    defines = ["-D_N_=32", "-D_CHUNK_LEN_=16"]
    assert [s for s in call["sources"] if s.endswith(".cu")] == [str(CU)]
    assert all(d in call["extra_cflags"] for d in defines)
    flags = call["extra_cuda_cflags"]
    assert flags[-2:] == defines
    if hip:
        assert not {"-res-usage", "--use_fast_math", "-Xptxas", "--extra-device-vectorization"} & set(flags)
    else:
        assert flags[:-2] == ["-res-usage", "--use_fast_math", "-O3", "-Xptxas", "-O3", "--extra-device-vectorization"]


def test_build_log_key_lines() -> None:
    log = "[1/3] c++ ok\nnoise\n/x/wkv7_cuda.cu(12): error: identifier \"foo\" is undefined\nninja: build stopped\n"
    lines = K._key_lines(log)
    assert "wkv7_cuda.cu(12): error" in lines and "noise" not in lines
    assert K._key_lines("a\nb\nc") == "a\nb\nc"  # no error line: the tail


# ----------------------------------------------------------------------------------------------
# GPU: the built extension (skipped without CUDA/ROCm)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")
GPU_TOL = {torch.float32: 3e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # ~10x the CPU harness


def run_gpu(x, dtype, with_state=True, use_state_grad=True):
    dev = "cuda"
    leaves = [x[n].to(dev, dtype).contiguous().requires_grad_() for n in ("r", "w", "k", "v", "a", "b")]
    s0 = x["s0"].to(dev, torch.float32).requires_grad_() if with_state else None
    y, sT = K.wkv7_kernel(*leaves, state=s0)
    loss = (y.float() * x["dy"].to(dev, dtype).float()).sum()
    if use_state_grad:
        loss = loss + (sT * x["dsT"].to(dev, torch.float32)).sum()
    loss.backward()
    return y, sT, [t.grad for t in leaves] + [s0.grad if with_state else None]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_state", [True, False])
def test_gpu_kernel_matches_reference(dtype: torch.dtype, with_state: bool) -> None:
    x = make_inputs(2, 64, 3, 64, seed=21)
    y, sT, grads = run_gpu(x, dtype, with_state)
    assert y.dtype == dtype and sT.dtype == torch.float32 and sT.shape == (2, 3, 64, 64)
    xr = rounded(x, dtype)
    y_ref, sT_ref, g_ref = reference(xr, with_state)
    tol = GPU_TOL[dtype]
    assert rel_err(y.cpu(), y_ref) < tol
    assert rel_err(sT.cpu(), sT_ref) < 1e-4  # the state is fp32 whatever the inputs
    for name, g, gr in zip(GRAD_NAMES, grads, g_ref):
        if gr is not None:
            assert g.dtype == (torch.float32 if name == "state" else dtype)
            assert rel_err(g.cpu(), gr) < tol, name


@pytest.mark.gpu
@gpu
def test_gpu_worst_case_decay_and_long_sequence() -> None:
    x = make_inputs(1, 512, 2, 64, seed=22, d_lo=D_MIN, d_hi=0.9)
    y, sT, grads = run_gpu(x, torch.float32)
    y_ref, sT_ref, g_ref = reference(rounded(x, torch.float32))
    assert rel_err(y.cpu(), y_ref) < 1e-4
    for name, g, gr in zip(GRAD_NAMES, grads, g_ref):
        assert rel_err(g.cpu(), gr) < 3e-4, name


@pytest.mark.gpu
@gpu
def test_gpu_unused_outputs_and_split_sequence() -> None:
    """Only y used (state gradient None) and a sequence run in two halves with the state carried
    equals one run over the whole (forward and input gradients)."""
    x = make_inputs(1, 64, 2, 64, seed=23)
    _, _, grads = run_gpu(x, torch.float32, with_state=True, use_state_grad=False)
    x0 = dict(x, dsT=torch.zeros_like(x["dsT"]))
    _, _, g_ref = reference(rounded(x0, torch.float32))
    for name, g, gr in zip(GRAD_NAMES, grads, g_ref):
        assert rel_err(g.cpu(), gr) < 3e-4, name
    ins = [x[n].cuda().float() for n in ("r", "w", "k", "v", "a", "b")]
    y_full, s_full = K.wkv7_kernel(*ins, state=x["s0"].cuda().float())
    y1, s1 = K.wkv7_kernel(*(t[:, :32].contiguous() for t in ins), state=x["s0"].cuda().float())
    y2, s2 = K.wkv7_kernel(*(t[:, 32:].contiguous() for t in ins), state=s1)
    assert rel_err(torch.cat([y1, y2], 1), y_full) < 1e-5 and rel_err(s2, s_full) < 1e-5


@pytest.mark.gpu
@gpu
def test_gpu_bad_inputs() -> None:
    ins = [torch.zeros(1, 32, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(6)]
    with pytest.raises(ValueError, match="state is on cpu; the kernel needs CUDA/ROCm tensors"):
        K.wkv7_kernel(*ins, state=torch.zeros(1, 2, 64, 64))
    with pytest.raises(ValueError, match="T=20 is not a positive multiple of 16"):
        K.wkv7_kernel(*(t[:, :20].contiguous() for t in ins))
    ops, stream = K.load_kernel(64), torch.cuda.current_stream().cuda_stream
    assert list(ops.build_config()) == [64, K.CHUNK_LEN]
    with pytest.raises(RuntimeError, match="T = 20 is not a multiple of 16"):
        ops.forward(*(t[:, :20].contiguous() for t in ins), None, stream)
    with pytest.raises(RuntimeError, match="state is on cpu; move r, w, k, v, a, b and the state to the GPU"):
        ops.forward(*ins, torch.zeros(1, 2, 64, 64), stream)


@pytest.mark.gpu
@gpu
def test_gpu_dispatcher_uses_the_kernel() -> None:
    from src.wkv7 import wkv7

    x = make_inputs(1, 32, 2, 64, seed=24)
    ins = [x[n].cuda().float() for n in ("r", "w", "k", "v", "a", "b")]
    y_k, s_k = K.wkv7_kernel(*ins)
    y_c, s_c = wkv7(*ins, impl="cuda")
    assert torch.equal(y_k, y_c) and torch.equal(s_k, s_c)
    y_t, s_t = wkv7(*ins, impl="torch")
    assert rel_err(y_k, y_t) < 1e-3 and rel_err(s_k, s_t) < 1e-3
