"""What the read-only analyses read: a store, or centroids in the seed layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from tlpersona.errors import TlpersonaError

if TYPE_CHECKING:
    from tlpersona.cache.reader import Store


@runtime_checkable
class ActivationSource(Protocol):
    """Persona × layer activations per position, behind the store's read interface.

    Implemented by :class:`tlpersona.cache.reader.Store` and
    :class:`tlpersona.cache.seed_layout.SeedSource`. Layers are block numbers (``layer_index``
    maps one to its row); tensors are ``[persona, layer, d_model]`` (centroids) and
    ``[persona, question, layer, d_model]`` (per question).
    """

    personas: list[str]
    questions: list[str]
    layers: list[int]
    positions: list[str]

    @property
    def provenance(self) -> dict[str, Any]: ...

    @property
    def manifest_hash(self) -> str: ...

    def question_invariant(self, position: str) -> bool: ...

    def centroids(self, position: str) -> torch.Tensor: ...

    def has_per_question(self, position: str) -> bool: ...

    def per_question(self, position: str, layer: int | None = None) -> torch.Tensor: ...

    def per_question_rows(self, position: str, start: int, stop: int) -> torch.Tensor: ...

    def valid(self, position: str) -> torch.Tensor: ...

    def n_tokens(self, position: str) -> torch.Tensor | None: ...

    def layer_index(self, layer: int) -> int: ...


def open_source(source: ActivationSource | str | Path) -> ActivationSource:
    """An opened source as is; a path opened as a store (verified) or, when it holds
    ``method_<x>/all_centroids.pt`` folders instead of a manifest, as a seed-layout directory."""
    from tlpersona.cache.reader import open_store
    from tlpersona.cache.schema import MANIFEST
    from tlpersona.cache.seed_layout import read_seed

    if not isinstance(source, (str, Path)):
        return source
    path = Path(source)
    if not (path / MANIFEST).exists() and any(path.glob("method_*/all_centroids.pt")):
        return read_seed(path)
    return open_store(path, verify=True)


def as_store(store: Store | str | Path) -> Store:
    """An opened store as is; a path opened and verified."""
    from tlpersona.cache.reader import Store, open_store

    return store if isinstance(store, Store) else open_store(store, verify=True)


def stored_layer(source: ActivationSource, layer: int) -> int:
    """``layer`` as a stored block number: negative numbers count from the end of the model
    (its block count from a store's manifest; for a seed layout, from the last stored layer).
    A layer the source lacks is an error."""
    if layer < 0:
        layer += getattr(source, "manifest", {}).get("n_layers_total") or max(source.layers) + 1
    source.layer_index(layer)
    return layer


def stored_layers(source: ActivationSource, layers: Sequence[int] | None) -> list[int] | None:
    """:func:`stored_layer` of each of ``layers`` (None: every stored layer)."""
    return None if layers is None else [stored_layer(source, layer) for layer in layers]


def source_for(source: ActivationSource | str | Path | None, manifest_hash: object,
               file: Path) -> ActivationSource | None:
    """``source`` opened, if given, and checked to be the store (by ``manifest_hash``) that the
    result in ``file`` was computed on."""
    if source is None:
        return None
    src = open_source(source)
    if src.manifest_hash != manifest_hash:
        raise TlpersonaError(f"`source` (manifest {src.manifest_hash[:12]}) is not the store "
                             f"{file} was computed on (manifest {str(manifest_hash)[:12]})")
    return src


def need_source(source: ActivationSource | None, what: str) -> ActivationSource:
    if source is None:
        raise TlpersonaError(f"{what} reads the store this result was computed on; this one was "
                             "loaded without it: load it again with `source`")
    return source
