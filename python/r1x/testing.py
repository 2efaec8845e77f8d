"""Helpers shared by r1x's tests and benchmarks (numerics metrics and input generators)."""

from __future__ import annotations

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric in float64: ``1 - 2 sum(xy) / sum(x^2 + y^2)``.

    0 for identical tensors; about ``rel_err^2 / 2`` for small relative errors.
    """
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def scaled_randn(
    shape,
    group: int = 128,
    spread: float = 3.0,
    dtype=torch.float32,
    device="cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Normal values whose magnitude changes by up to ``10**±spread`` from one ``group``-wide
    block of the last dimension to the next (so per-block scales differ strongly)."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    k = shape[-1]
    nblocks = (k + group - 1) // group
    mag = 10 ** ((torch.rand((*shape[:-1], nblocks), generator=generator, dtype=torch.float64) * 2 - 1) * spread)
    x = x * mag.repeat_interleave(group, dim=-1)[..., :k]
    return x.to(dtype=dtype, device=device)


def random_fp8(shape, device="cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Random finite e4m3 values (uniform over all finite bit patterns, subnormals included)."""
    bits = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    bits = torch.where((bits & 0x7F) == 0x7F, bits & 0xF0, bits)  # drop the NaN patterns
    return bits.view(torch.float8_e4m3fn).to(device)


def random_scales(shape, spread: float = 4.0, device="cpu", generator=None) -> torch.Tensor:
    """Positive float32 scales spread over ``10**±spread``."""
    e = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * spread
    return (10**e).float().to(device)


def assert_raises_naming(fn, *names) -> None:
    """``fn()`` must raise RuntimeError/ValueError/TypeError whose message contains every one
    of ``names`` (the argument it names, what was expected)."""
    try:
        fn()
    except (RuntimeError, ValueError, TypeError) as e:
        msg = str(e)
        for name in names:
            assert name in msg, f"error message does not name {name!r}: {msg}"
        return
    raise AssertionError(f"no error raised; expected one naming {names}")
