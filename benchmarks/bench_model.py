#!/usr/bin/env python3
"""The whole model: training-step tokens/s of `tiny` and `small` on r1x ops vs the same model on
r1x.reference's plain-PyTorch ops; greedy decode with the latent cache vs re-running the forward
without a cache; MTP speculative decoding vs plain decode (random weights, and a tiny model
briefly trained on arithmetic sequences so that drafts are accepted); latent cache bytes per
token vs an MHA cache of the same model (tiny, small, v2-lite, v3).

    python benchmarks/bench_model.py                          # default plan on the default device
    python benchmarks/bench_model.py --full                   # small at 4x512, also 512 new tokens
    python benchmarks/bench_model.py --parts train,cache --presets tiny --threads 1 --out /tmp/r
    python benchmarks/bench_model.py --parts spec --presets tiny --new-tokens 64 --train-steps 200

Writes benchmarks/results/model_<cpu|cuda>.{json,md,png}. See r1x/bench/model.py.
"""

from r1x.bench.model import main

if __name__ == "__main__":
    main()
