"""Float tolerances derived from the computation compared, never measured on one CPU.

Two float32 runs of the same network differ where they accumulate sums in another
order: another instruction set (AVX2 against AVX-512, oneDNN's kernels against ATen's),
another thread count, a conv with a BatchNorm folded in. Each sum of ``fan_in``
products rounds with an error of about ``sqrt(fan_in) * eps`` of its magnitude (the
standard probabilistic bound for round-to-nearest; the worst case is ``fan_in * eps``),
and through ``depth`` layers whose norms keep activations at unit scale, the errors of
the layers add. Two runs each carry such an error, hence the factor 2. The bound is
relative to the largest magnitude of the compared values, as rounding error is.
"""
import math

import torch

__all__ = ["rounding_bound", "assert_close_to_rounding"]


def rounding_bound(depth, fan_in, dtype=torch.float32):
    """Relative difference two runs of ``depth`` layers, each summing ``fan_in``
    products in ``dtype``, may show from rounding alone."""
    return 2 * depth * math.sqrt(fan_in) * torch.finfo(dtype).eps


def assert_close_to_rounding(actual, expected, depth, fan_in, what="", dtype=None):
    """``actual`` equals ``expected`` within :func:`rounding_bound` (in ``dtype``, by
    default ``actual``'s) of ``expected``'s largest magnitude; the message gives the
    difference found and the bound."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    dtype = dtype or actual.dtype
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    bound = rounding_bound(depth, fan_in, dtype) * max(scale, 1e-30)
    diff = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert diff <= bound, f"{what}: max |difference| {diff:.3g} > {bound:.3g} (largest |value| {scale:.3g})"
