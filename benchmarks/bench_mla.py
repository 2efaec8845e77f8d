#!/usr/bin/env python3
"""Multi-head Latent Attention: r1x.mla_attention (causal, qk 192 / v 128) vs every SDPA backend,
forward and forward+backward; its peak memory against the sequence length (vs SDPA math);
r1x.mla_decode over a paged latent cache vs the naive absorbed einsum, the non-absorbed path
(decompress + SDPA) and, on CUDA, FlashMLA.

    python benchmarks/bench_mla.py                     # default plan on the default device
    python benchmarks/bench_mla.py --full              # also the longer sequences and contexts
    python benchmarks/bench_mla.py --parts decode --dtypes bf16 --decode 8x16x1x4096 --out /tmp/r
    python benchmarks/bench_mla.py --parts train,memory --train 1x2048 --mem-lens 1024,2048

Writes benchmarks/results/mla_<cpu|cuda>.{json,md,png}. See r1x/bench/mla.py.
"""

from r1x.bench.mla import main

if __name__ == "__main__":
    main()
