"""How the tests compare two computations, so that a comparison holds on every CPU.

A test states one of three claims:

- **bit-exact**: the code promises the very same bits (a save/load round trip, a resumed run,
  the same kernels on the same shapes): ``torch.equal``.
- **mathematically equal** (an optimised path against the plain one: trimmed padding, cached
  tokens, DDP against one process, checkpointing): both sides run in float64, where any
  reordering of sums changes results by ~1e-16 relative, and must agree to ``EXACT_F64``
  (1e-12 relative to the magnitude of the compared values). A real bug (a wrong mask, a missing
  term) moves results by far more than that, while fp32 kernels that block their sums
  differently per CPU (AVX-512, AVX2, SSE) or per thread count never enter.
- **close to a stated precision**: a lossy path (bf16, fp16 storage, fp32 against a float64
  reference) is compared with a tolerance derived from its unit roundoff ``u`` (2**-24 for fp32,
  2**-8 for bf16, 2**-11 for fp16) times a stated growth factor.

Element-wise relative tolerances are the wrong tool for results of sums: an element that
cancels to near zero keeps the absolute error of its large terms. So ``assert_close`` bounds
the largest absolute difference by ``rel`` times the largest magnitude of the reference.
"""
from __future__ import annotations

import torch

FP32_U = 2.0 ** -24  # unit roundoff of float32
BF16_U = 2.0 ** -8
FP16_U = 2.0 ** -11
EXACT_F64 = 1e-12  # float64 results of the same mathematics, summed in another order


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if expected.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """``max |actual - expected| <= rel * max(|expected|)`` (scale of the values, not per element)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = float(expected.detach().double().abs().max()) if expected.numel() else 0.0
    err = max_error(actual, expected)
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3g} > {rel:.3g} x scale {scale:.3g}"


def assert_float64_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Mathematically equal computations, both in float64."""
    assert actual.dtype == expected.dtype == torch.float64, f"{what}: compare in float64 ({actual.dtype}, {expected.dtype})"
    assert_close(actual, expected, EXACT_F64, what)


def assert_grads_float64_equal(a: dict, b: dict) -> None:
    """Two {name: gradient} dicts of float64 models: same keys, mathematically equal values."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert_float64_equal(a[k], b[k], k)
