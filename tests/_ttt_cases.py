"""Helpers shared by the In-Place TTT tests: a seeded layer away from its init, seeded
inputs, and the comparison with the float64 reference."""
from __future__ import annotations

import torch

from ctxpar.ttt import InPlaceTTTMLP
from ctxpar.ttt.reference import GatedMLP

D, FF, B, C = 8, 16, 2, 4
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_layer(dtype, group=None, trained=True, **options) -> InPlaceTTTMLP:
    """A seeded layer on a ``GatedMLP(D, FF)``; ``trained``: every TTT parameter away from
    its init, so that ΔW != 0. ``options`` go to :class:`ctxpar.ttt.TTTConfig` (chunk_size
    defaults to C)."""
    torch.manual_seed(0)
    layer = InPlaceTTTMLP(GatedMLP(D, FF).double(), group=group,
                          chunk_size=options.pop("chunk_size", C), **options).double()
    if trained:
        with torch.no_grad():
            layer.ttt_conv.normal_()
            if layer.ttt_proj is not None:  # proj=False: V̂ = Conv(T)
                layer.ttt_target.normal_(std=0.3)
            layer.ttt_eta.fill_(0.3)
    return layer.to(dtype)


def make_data(dtype, seq: int, batch: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded input ``[batch, seq, D]`` in ``dtype`` and an output gradient in float64."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq, D, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randn(batch, seq, D, generator=g, dtype=torch.float64)


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """Max error of ``got`` within ``tol`` times the largest magnitude of ``want``."""
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert scale > 0, what
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs magnitude {scale:.3g} (tol {tol})"
