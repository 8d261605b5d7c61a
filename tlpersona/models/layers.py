"""Which blocks a run reads: layer specs, the default quartile set, and range checks.

Layer ``l`` everywhere in tlpersona is the output of block ``l``:
``blocks.{l}.hook_resid_post`` = HF ``hidden_states[l+1]`` for ``l < n_layers-1``. HF's final
hidden state is taken after the model's final norm; ours, for the last layer, is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from tlpersona.errors import TlpersonaError


def default_layers(n_layers: int) -> list[int]:
    """Quartile layers ending at the last block: 7,14,21,27 for 28 layers."""
    return sorted({n_layers * k // 4 for k in (1, 2, 3)} | {n_layers - 1})


def check_layers(layers: list[int], n_layers: int) -> None:
    """One-line error for the first block index outside the model."""
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise TlpersonaError(f"layer {bad[0]} is out of range for a {n_layers}-layer model")


#: Which blocks to read: block indices (negative counts from the end), ``"default"`` (the
#: quartile set plus the last block) or ``"all"``.
LayerSpec = Sequence[int] | Literal["default", "all"]


def resolve_layers(spec: LayerSpec | None, n_layers: int) -> list[int]:
    """Block indices of ``spec`` (None = ``"default"``) for an ``n_layers``-layer model, sorted."""
    if spec is None or spec == "default":
        return default_layers(n_layers)
    if spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        raise TlpersonaError(f"`layers` must be block indices, 'default' or 'all', not {spec!r}")
    out = []
    for item in spec:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TlpersonaError(f"`layers`: {item!r} is not a block index")
        layer = item + n_layers if item < 0 else item
        if not 0 <= layer < n_layers:
            raise TlpersonaError(f"`layers`: layer {item} is out of range for a {n_layers}-layer model")
        out.append(layer)
    if not out:
        raise TlpersonaError("`layers` is empty")
    return sorted(set(out))
