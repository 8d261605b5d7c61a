"""Residual-stream edits along one direction, one edit per batch row.

Every operator is a clamp of the projection onto a unit direction ``u`` plus an added vector::

    p  = h · u
    h' = h + delta + (clamp(p, lo, hi) - p) · u

* steering (``add``):   ``delta = alpha · v``, ``lo = -inf``, ``hi = +inf``, ``u = 0``
* ablation:             ``lo = hi = 0`` (the component along ``u`` projected out)
* activation capping:   ``lo = tau``, ``hi = +inf`` (projections below ``tau`` raised to it; the
  intervention of the Assistant-Axis work, with ``u`` pointing to the assistant)

Writing all three as one formula lets rows of different operators share one batched forward:
each row carries its own ``delta``, ``u``, ``lo`` and ``hi``, and a row with all of them neutral
is left exactly as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPERATORS = ("add", "ablate", "cap")


@dataclass
class RowEdits:
    """Edits of ``rows`` batch rows at one layer: ``delta``/``u`` ``[rows, d]``, ``lo``/``hi``
    ``[rows]``, ``start`` ``[rows]`` (first edited position; ``seq`` or more leaves a row alone).
    """

    delta: torch.Tensor
    u: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    start: torch.Tensor

    @classmethod
    def neutral(cls, rows: int, d: int, dtype: torch.dtype = torch.float32) -> RowEdits:
        return cls(torch.zeros(rows, d, dtype=dtype), torch.zeros(rows, d, dtype=dtype),
                   torch.full((rows,), -math.inf, dtype=dtype),
                   torch.full((rows,), math.inf, dtype=dtype), torch.zeros(rows, dtype=torch.long))

    def set(self, row: int, start: int, *, delta: torch.Tensor | None = None,
            u: torch.Tensor | None = None, lo: float = -math.inf, hi: float = math.inf) -> None:
        if delta is not None:
            self.delta[row] = delta
        if u is not None:
            self.u[row] = u
        self.lo[row] = lo
        self.hi[row] = hi
        self.start[row] = start

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` ``[rows, seq, d]`` → edited copy (positions before each row's start untouched)."""
        dev, dt = h.device, h.dtype
        edited = edit(h, self.delta.to(dev, dt), self.u.to(dev, dt), self.lo.to(dev, dt),
                      self.hi.to(dev, dt))
        pos = torch.arange(h.shape[1], device=dev)
        keep = pos[None, :] < self.start.to(dev)[:, None]  # [rows, seq]
        return torch.where(keep[..., None], h, edited)


def edit(h: torch.Tensor, delta: torch.Tensor, u: torch.Tensor | None = None,
         lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
    """The module's formula at every position: ``h`` ``[rows, seq, d]``, ``delta``/``u``
    ``[rows, d]``, ``lo``/``hi`` ``[rows]``, all on ``h``'s device and dtype. Without ``u``
    only ``delta`` is added (what the formula gives when every ``u`` is zero)."""
    out = h + delta[:, None, :]
    if u is None:
        return out
    assert lo is not None and hi is not None, "a direction needs its bounds"
    p = torch.einsum("bsd,bd->bs", h, u)
    target = torch.clamp(p, lo[:, None], hi[:, None])
    return out + (target - p)[..., None] * u[:, None, :]


def unit(v: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` (``[..., d]``) scaled to unit length (float64 norm)."""
    n = v.double().norm(dim=-1, keepdim=True)
    return (v.double() / n).to(v.dtype)
