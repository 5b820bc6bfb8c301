"""WKV7 kernel resources per GPU target, read off the compilers (no GPU needed), as one table.

    python -m benchmarks.kernel_resources                  # every compiler found, head size 64
    python -m benchmarks.kernel_resources --head_size 128

For each kernel (forward/backward x bf16/fp16/fp32) and target: registers per thread, the per-thread
stack/scratch memory (ptxas "bytes stack frame", AMD "ScratchSize" per lane: the same measure) and
what spilled (ptxas: bytes of spill stores/loads; AMD: VGPRs spilled). The backstepping design wants
no spills (the state row lives in registers; a spill costs memory traffic in every time step).
- NVIDIA: nvcc with the flags torch's build adds and kernel.py's, `-Xptxas -v`, for each target of
  NV_TARGETS that this nvcc can build (CUDA 13 dropped sm_70; sm_120 needs CUDA 12.8 or later).
- AMD: torch's hipify of cuda/wkv7_cuda.cu, then hipcc with the flags torch's ROCm build adds and
  kernel.py's, `-Rpass-analysis=kernel-resource-usage` (gfx90a MI200, gfx1030 RDNA2). On HIP older
  than 5.7 (no <hip/hip_bf16.h>) tests/hip_compat supplies that header. "regs" there is VGPRs +
  AGPRs (the 512-entry unified file of gfx90a and later, 256 on RDNA).
Figures depend on the compiler version: say which in RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.table import markdown_table
from src.wkv7 import kernel as K

REPO = Path(__file__).resolve().parents[1]
CU = REPO / "cuda" / "wkv7_cuda.cu"
HIP_COMPAT = REPO / "tests" / "hip_compat"
# The GPUs people train this model on: laptop and desktop cards as well as data-centre ones.
NV_TARGETS = {"70": "V100", "75": "T4, RTX 20xx", "80": "A100, A30", "86": "RTX 30xx, A10",
              "89": "RTX 40xx, L4", "90": "H100, H200", "120": "RTX 50xx"}
AMD_ARCHS = ("gfx90a", "gfx1030")
ELEMS = {"13__nv_bfloat16": "bf16", "14__hip_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}


def _kernel_label(mangled: str) -> str:
    m = re.search(r"(forward|backward)_kernelI(\w+?)E", mangled)
    return f"{m.group(1)} {ELEMS.get(m.group(2), m.group(2))}" if m else mangled


Row = tuple[str, str, str, int, int, str]  # compiler, target, kernel, registers, stack bytes, spilled


def nv_archs() -> tuple[str, ...]:
    """The NV_TARGETS compute capabilities (e.g. "86") that the nvcc on PATH can compile for."""
    listed = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
    return tuple(a for a in NV_TARGETS if f"compute_{a}" in listed)


def nvcc_command(defines: list[str], out: Path, archs: tuple[str, ...]) -> list[str]:
    """nvcc on cuda/wkv7_cuda.cu with the flags of torch's build and kernel.py's, for `archs`, with
    ptxas' per-kernel report (-v)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return ["nvcc", "-c", "-std=c++20", "-Xcompiler", "-fPIC", *COMMON_NVCC_FLAGS, *K._NVCC_FLAGS, "-Xptxas", "-v",
            *defines, *gencode, str(CU), "-o", str(out)]


def nvcc_rows(defines: list[str], tmp: Path) -> list[Row]:
    """Rows from ptxas -v."""
    res = subprocess.run(nvcc_command(defines, tmp / "k.o", nv_archs()), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{res.stderr[-3000:]}")
    version = re.search(r"release ([\d.]+)", subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout)
    rows, name, arch, stack, spill = [], "", "", 0, ""
    for line in res.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line):
            name, arch = m.group(1), m.group(2)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            stack, spill = int(m.group(1)), f"st {m.group(2)} B / ld {m.group(3)} B"
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            target = f"sm_{arch} ({NV_TARGETS.get(arch, '?')})"
            rows.append((f"nvcc {version.group(1) if version else '?'}", target, _kernel_label(name),
                         int(m.group(1)), stack, spill))
            name = ""
    return rows


def hipcc(args: list[str], **kw) -> subprocess.CompletedProcess:
    """hipcc for AMD GPUs: Debian's hipcc picks the NVIDIA platform when nvcc is on PATH."""
    return subprocess.run(["hipcc", *args], capture_output=True, text=True,
                          env={**os.environ, "HIP_PLATFORM": "amd"}, **kw)


def hip_header_found(header: str, tmp: Path) -> bool:
    probe = tmp / "probe.hip"  # hipcc wants a file (not stdin) and a target, or it asks the GPU
    probe.write_text(f"#include <{header}>\n")
    return hipcc([f"--offload-arch={AMD_ARCHS[0]}", "-E", "-o", os.devnull, str(probe)]).returncode == 0


def hip_compat_flags(tmp: Path) -> list[str]:
    """-I for tests/hip_compat when this HIP install lacks <hip/hip_bf16.h> (ROCm < 5.7)."""
    return [] if hip_header_found("hip/hip_bf16.h", tmp) else [f"-I{HIP_COMPAT}"]


def hipify(sources: list[Path], tmp: Path) -> list[Path]:
    """What torch's ROCm build (cpp_extension.load) compiles for `sources`: torch's hipify of copies
    of them under tmp (it writes beside its inputs), one output path per source."""
    from torch.utils.hipify import hipify_python

    src, build = tmp / "src", tmp / "build"
    src.mkdir()
    build.mkdir()
    copies = [Path(shutil.copy(f, src / f.name)) for f in sources]
    with contextlib.redirect_stderr(io.StringIO()):  # hipify prints a banner
        result = hipify_python.hipify(project_directory=str(build), output_directory=str(build),
                                      extra_files=[str(c) for c in copies], is_pytorch_extension=True,
                                      show_detailed=False, show_progress=False)
    return [Path(result[str(c)].hipified_path) for c in copies]


def hipcc_command(hip_cu: Path, defines: list[str], archs: tuple[str, ...], compat: list[str],
                  out: Path) -> list[str]:
    """hipcc arguments for a hipified kernel with the flags of torch's ROCm build and kernel.py's, for
    `archs`, with the per-kernel resource remarks (see hip_remarks); compat: hip_compat_flags()."""
    from torch.utils.cpp_extension import COMMON_HIP_FLAGS, COMMON_HIPCC_FLAGS

    return ["-c", "-std=c++20", *COMMON_HIP_FLAGS, *COMMON_HIPCC_FLAGS, *K._HIPCC_FLAGS, *defines,
            *compat, "-fno-gpu-rdc", *(f"--offload-arch={a}" for a in archs),
            "-Rpass-analysis=kernel-resource-usage", str(hip_cu), "-o", str(out)]


def hip_remarks(log: str) -> list[dict[str, str]]:
    """hipcc's -Rpass-analysis=kernel-resource-usage remarks, one dict per kernel in order: "name",
    and "VGPRs", "AGPRs", "ScratchSize", "VGPRs Spill" where reported."""
    kernels: list[dict[str, str]] = []
    for line in log.splitlines():
        m = re.search(r"remark:\s+(Function Name|VGPRs|AGPRs|ScratchSize \[bytes/lane\]|VGPRs Spill): (\S+)", line)
        if m and m.group(1) == "Function Name":
            kernels.append({"name": m.group(2)})
        elif m and kernels:
            key = m.group(1)
            kernels[-1][key if key == "VGPRs Spill" else key.split()[0]] = m.group(2)
    return kernels


def hipcc_rows(defines: list[str], tmp: Path) -> list[Row]:
    """Rows from hipcc's remarks (registers = VGPRs + AGPRs), one target at a time (the remarks do
    not name the target)."""
    [hip_cu] = hipify([CU], tmp)
    compat = hip_compat_flags(tmp)   # one header probe for all targets
    version = re.search(r"clang version ([\d.]+)", hipcc(["--version"]).stdout)
    rows = []
    for arch in AMD_ARCHS:
        res = hipcc(hipcc_command(hip_cu, defines, (arch,), compat, tmp / f"{arch}.o"))
        if res.returncode != 0:
            raise RuntimeError(f"hipcc failed for {arch}:\n{res.stderr[-3000:]}")
        for k in hip_remarks(res.stderr):
            rows.append((f"hip clang {version.group(1) if version else '?'}", arch, _kernel_label(k["name"]),
                         int(k.get("VGPRs", 0)) + int(k.get("AGPRs", 0)), int(k.get("ScratchSize", 0)),
                         f"{k.get('VGPRs Spill', '0')} VGPRs"))
    return rows


def _row_order(row: Row) -> tuple:
    """Compiler, then targets by number (sm_75 before sm_120, gfx90a before gfx1030), then kernel."""
    arch = re.search(r"\d+", row[1])
    return row[0], int(arch.group()) if arch else 0, row[1], row[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head_size", type=int, default=64, choices=K.SUPPORTED_HEAD_SIZES)
    args = ap.parse_args()
    defines = [f"-D_N_={args.head_size}", f"-D_CHUNK_LEN_={K.CHUNK_LEN}"]
    rows, missing = [], []
    with tempfile.TemporaryDirectory() as d:
        for tool, fn in (("nvcc", nvcc_rows), ("hipcc", hipcc_rows)):
            if shutil.which(tool):
                sub = Path(d) / tool
                sub.mkdir()
                rows += fn(defines, sub)
            else:
                missing.append(tool)
    print(f"WKV7 kernel resources, head size {args.head_size}, chunk {K.CHUNK_LEN}")
    print(markdown_table(["compiler", "target", "kernel", "regs/thread", "stack/scratch B", "spilled"],
                         sorted(rows, key=_row_order), "lllrrl"))
    for tool in missing:
        print(f"({tool} not found: its rows are missing)")


if __name__ == "__main__":
    main()
