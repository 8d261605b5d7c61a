"""Persona vectors: the one definition that projection, steering and export share.

A persona's vector for one recipe and layer is its centroid minus a reference: the mean of all
stored personas' centroids (``relative_to="all"``, what steering adds) or the mean of the
*other* personas' centroids (``relative_to="others"``, the persona's axis, e.g. the assistant
axis that projection and capping use). The two differ only in scale: for n personas,
``others = all · n / (n − 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from tlpersona.errors import TlpersonaError

Reference = Literal["all", "others"]


def centred(centroids: torch.Tensor) -> torch.Tensor:
    """``[persona, d]`` → ``[persona, d]`` float64: every persona's vector relative to the mean
    of all personas."""
    c = centroids.double()
    return c - c.mean(0, keepdim=True)


def axis(centroids: torch.Tensor, index: int) -> torch.Tensor:
    """``[persona, d]`` → ``[d]`` float64: persona ``index``'s centroid minus the mean of the other
    personas' centroids (not normalised)."""
    c = centroids.double()
    others = torch.cat([c[:index], c[index + 1:]]).mean(0)
    return c[index] - others


@dataclass(frozen=True)
class PersonaVector:
    """One persona's residual-stream direction for one recipe at one layer, with where it came
    from. Layer ``l`` is the output of block ``l`` (``blocks.{l}.hook_resid_post``)."""

    vector: torch.Tensor  # [d_model] float32
    persona: str
    position: str
    layer: int
    relative_to: Reference
    model: str | None  # the store's model spec and identity (None for a seed-layout source)
    model_identity: str | None
    source_manifest_hash: str

    @property
    def norm(self) -> float:
        return float(self.vector.double().norm())

    def provenance(self) -> dict[str, Any]:
        """Everything but the tensor, JSON-ready."""
        return {"persona": self.persona, "position": self.position, "layer": self.layer,
                "relative_to": self.relative_to, "model": self.model,
                "model_identity": self.model_identity,
                "source_manifest_hash": self.source_manifest_hash,
                "hook": f"blocks.{self.layer}.hook_resid_post"}


def persona_vector(source: Any, persona: str, position: str, layer: int,
                   relative_to: Reference = "all") -> PersonaVector:
    """:class:`PersonaVector` of ``persona`` from an activation source (store or seed layout)."""
    if relative_to not in ("all", "others"):
        raise TlpersonaError(f"`relative_to` must be 'all' or 'others', not {relative_to!r}")
    if persona not in source.personas:
        raise TlpersonaError(f"persona {persona!r} is not in the store")
    if len(source.personas) < 2:
        raise TlpersonaError("a persona vector needs at least two stored personas")
    cent = source.centroids(position)[:, source.layer_index(layer)]
    i = source.personas.index(persona)
    vec = centred(cent)[i] if relative_to == "all" else axis(cent, i)
    prov = source.provenance
    return PersonaVector(vec.float(), persona, position, layer, relative_to, prov.get("model"),
                         prov.get("model_identity"), source.manifest_hash)
