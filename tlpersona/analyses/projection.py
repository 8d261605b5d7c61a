"""Project personas, and new material, onto shared PCs or onto a persona axis.

A projection is per recipe and layer: ``coords = (x - mean) / scale @ basis.T`` where ``mean`` is
the recipe's mean centroid over the stored personas, ``scale`` its Frobenius norm when the PCs
were fitted with unit-norm recipes (else 1), and ``basis`` ``[k, d]`` either the top-k shared PCs
or one unit axis. The default axis is the assistant axis: the ``assistant`` persona's centroid
minus the mean of the other personas' centroids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tlpersona.analyses import metrics as M
from tlpersona.cache.vectors import axis as persona_axis
from tlpersona.errors import TlpersonaError


@dataclass
class Frame:
    """One recipe's coordinate frame at one layer."""

    mean: np.ndarray  # [d]
    scale: float
    basis: np.ndarray  # [k, d], orthonormal rows
    names: list[str]  # coordinate names

    def coords(self, x: np.ndarray) -> np.ndarray:
        """``[n, d]`` → ``[n, k]``."""
        return ((x - self.mean) / self.scale) @ self.basis.T


def pc_frame(cent: np.ndarray, components: np.ndarray, k: int, unit_norm: bool) -> Frame:
    """Frame of the top-``k`` shared PCs for one recipe's stored centroids ``[persona, d]``."""
    mean = cent.mean(0)
    scale = float(np.linalg.norm(cent - mean)) if unit_norm else 1.0
    return Frame(mean, scale, components[:k], [f"PC{i + 1}" for i in range(k)])


def axis_frame(cent: np.ndarray, personas: list[str], persona: str) -> Frame:
    """Frame of one axis: ``persona``'s centroid minus the mean of the others (unit length)."""
    if persona not in personas:
        raise TlpersonaError(f"persona {persona!r} is not in the store; cannot build its axis")
    i = personas.index(persona)
    axis = persona_axis(torch.from_numpy(cent), i).numpy()
    norm = np.linalg.norm(axis)
    if norm == 0:
        raise TlpersonaError(f"the {persona} axis is zero")
    return Frame(cent.mean(0), 1.0, (axis / norm)[None], [f"{persona} axis"])


def nearest(x: np.ndarray, cent: np.ndarray, personas: list[str], top: int = 5) -> list[dict[str, Any]]:
    """Stored personas closest to ``x`` ``[d]`` by cosine, both centred on the stored mean."""
    mean = cent.mean(0)
    cos = M.unit(cent - mean) @ M.unit((x - mean)[None])[0]
    order = np.argsort(-cos)[:top]
    return [{"persona": personas[j], "cos": float(cos[j])} for j in order]
