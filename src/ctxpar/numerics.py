"""Numerical conventions shared by every layer: the accumulation dtype and the relative
error that every check against a float64 reference reports."""
from __future__ import annotations

import torch

__all__ = ["acc_dtype", "rel_error"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of outputs, LSEs, gradients and scan carries: float64 for float64
    inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rel_error(x: torch.Tensor, ref: torch.Tensor, floor: float = 1.0) -> float:
    """Max absolute error of ``x`` against ``ref``, relative to ``max(floor, max |ref|)``.
    Non-finite entries of ``ref`` (e.g. an LSE of ``-inf`` for a row that sees no key) must
    be matched exactly, else the error is infinite; so is a non-finite ``x`` where ``ref``
    is finite."""
    x, ref = x.detach().double(), ref.detach().double()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(x), finite) or not torch.equal(x[~finite], ref[~finite]):
        return float("inf")
    if not bool(finite.any()):
        return 0.0
    err = (x[finite] - ref[finite]).abs().max() / ref[finite].abs().max().clamp(min=floor)
    return float(err)
