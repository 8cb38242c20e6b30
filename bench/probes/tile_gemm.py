"""MKL against hand-written AVX-512 kernels on the fused RLL's tile GEMMs, one thread (bench/RESULTS.md §18).

    OMP_NUM_THREADS=1 .venv/bin/python bench/probes/tile_gemm.py

Builds tile_gemm.cpp (~30 s, torch.utils.cpp_extension) and prints GFLOP/s per tile shape: the Gram
tile A B^T (MKL's at::mm_out, a 4 x 4 dot-product kernel, a 6 x 64 broadcast kernel on B^T) and the
coefficient product H Z (MKL's addmm_, the 6 x 64 kernel), with each hand kernel's largest difference
from MKL. Compare with bench/probes/fma_peak.c, the core's FMA rate.
"""

from __future__ import annotations

import os

import torch
from torch.utils.cpp_extension import load

FLAGS = ["-O3", "-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
FLAGS += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]


def main() -> None:
    torch.set_num_threads(1)
    here = os.path.dirname(os.path.abspath(__file__))
    mod = load("rll_tile_gemm_probe", [os.path.join(here, "tile_gemm.cpp")], extra_cflags=FLAGS)
    head = ["b", "D", "gram MKL", "gram dot 4x4", "gram 6x64 on B^T", "coef MKL", "coef 6x64"]
    print("| " + " | ".join(head) + " | max diff (dot, 6x64, coef) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for b, d in ((64, 128), (64, 512), (128, 512)):
        for _ in range(2):
            r = mod.probe(b, d, 300)
            rates = " | ".join(f"{x:.0f}" for x in r[:5])
            print(f"| {b} | {d} | {rates} | {r[5]:.1e}, {r[6]:.1e}, {r[7]:.1e} |")


if __name__ == "__main__":
    main()
