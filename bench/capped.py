"""Run a command with the numerical libraries capped at an older instruction set, to see what a CPU without
AVX-512 would do with the same code: ``python bench/capped.py avx2 -- python bench/bench_int8.py ...``.

Each library that chooses its kernels by the CPU has its own switch, read once per process, so the caps go
into the environment of a fresh process (and of every process it starts, such as a benchmark's server):

- PyTorch's own vectorised kernels: ``ATEN_CPU_CAPABILITY``;
- oneDNN (PyTorch's float32 and int8 primitives): ``ONEDNN_MAX_CPU_ISA``;
- FBGEMM (PyTorch's int8 linear kernels): ``FBGEMM_ENABLE_INSTRUCTIONS``;
- MKL (PyTorch's float32 matrix products): ``MKL_ENABLE_INSTRUCTIONS``;
- faiss: ``FAISS_SIMD_LEVEL``; NumPy: ``NPY_DISABLE_CPU_FEATURES``.

ONNX Runtime has no such switch: its figures in a capped run still use every instruction the CPU has, and the
benchmarks say so. A cap reproduces an older CPU's instructions and kernels (and clipforge's choices that follow
them, such as 7-bit int8 activations without VNNI), not its clock, caches or memory: capped figures are ratios
for the instruction set, not a stand-in for another machine's absolute times.
"""
from __future__ import annotations

import argparse
import os
import sys

# NumPy's dispatch targets above AVX2, under the names NumPy 1.x and 2.x use (unknown names are ignored)
_NUMPY_AVX512 = ("AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL "
                 "AVX512_SPR X86_V4")

CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "FAISS_SIMD_LEVEL": "AVX2", "NPY_DISABLE_CPU_FEATURES": _NUMPY_AVX512},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "FAISS_SIMD_LEVEL": "AVX512"},  # AVX-512 without VNNI or AMX (a Skylake server)
}


def capped_environment(isa: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (this process's by default) with every library capped at ``isa``."""
    return {**(os.environ if environ is None else environ), **CAPS[isa], "CLIPFORGE_BENCH_ISA_CAP": isa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="python bench/capped.py {avx2,avx512} -- COMMAND [ARG ...]")
    parser.add_argument("isa", choices=sorted(CAPS))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run: put it after --, e.g. -- python bench/bench_int8.py")
    print(f"capped at {args.isa}: " + " ".join(f"{k}={v!r}" for k, v in CAPS[args.isa].items()), file=sys.stderr,
          flush=True)
    os.execvpe(command[0], command, capped_environment(args.isa))


if __name__ == "__main__":
    main()
