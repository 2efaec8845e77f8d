#!/usr/bin/env python3
"""FP8 block-scaled GEMM vs bf16 matmul, dequantize-then-matmul, torch._scaled_mm and DeepGEMM.

    python benchmarks/bench_fp8_gemm.py                 # default shapes on the default device
    python benchmarks/bench_fp8_gemm.py --shapes 1x7168x2048,4096x7168x2048 --out /tmp/r

Writes benchmarks/results/fp8_gemm_<cpu|cuda>.{json,md,png}. See r1x/bench/fp8_gemm.py.
"""

from r1x.bench.fp8_gemm import main

if __name__ == "__main__":
    main()
