#!/usr/bin/env python3
"""The DeepSeekMoE layer (r1x.nn.MoE) vs DeepSeek-V3's per-expert loop, torch._grouped_mm, and
its own FP8 experts; fwd+bwd; where the forward's time goes; on CUDA the FP8 grouped GEMM.

    python benchmarks/bench_moe.py                     # default plan on the default device
    python benchmarks/bench_moe.py --full              # also DeepSeek-V2-Lite at T = 4096 (CPU)
    python benchmarks/bench_moe.py --layers small --tokens 1,16 --out /tmp/r

Writes benchmarks/results/moe_<cpu|cuda>.{json,md,png}. See r1x/bench/moe.py.
"""

from r1x.bench.moe import main

if __name__ == "__main__":
    main()
