"""Which personas an intervention runs on: the stored recipes worth steering with, the
contrasting personas farthest from the base persona on its axis (what steering targets and
patching takes as clean personas), and patching's choice of clean personas."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tlpersona.cache.source import ActivationSource
from tlpersona.cache.vectors import axis
from tlpersona.data import Persona
from tlpersona.errors import TlpersonaError
from tlpersona.runtime.edits import unit


@dataclass
class PersonaChoice:
    names: list[str]
    reason: str
    axis_position: dict[str, float]  # mean standardised projection on the base axis


def default_recipes(store: ActivationSource) -> list[str]:
    """Every stored position but ``first``: token 0 is the same in every prompt, so its persona
    vector is zero and steering with it is meaningless."""
    return [p for p in store.positions if p != "first"]


def choose_personas(store: ActivationSource, base: str, n: int, names: list[str] | None,
                    recipes: list[str], layer: int) -> PersonaChoice:
    """``names`` as given, else the ``n`` stored personas farthest from the base on its axis
    (projection of each recipe's centroids, standardised per recipe, averaged over recipes)."""
    others = [p for p in store.personas if p != base]
    li = store.layer_index(layer)
    b = store.personas.index(base)
    z = np.zeros(len(store.personas))
    for r in recipes:
        c = store.centroids(r)[:, li]
        proj = (c.double() @ unit(axis(c, b))).numpy()
        z += (proj - proj.mean()) / (proj.std() or 1.0)
    z /= len(recipes)
    position = {p: float(z[i]) for i, p in enumerate(store.personas)}
    if names:
        return PersonaChoice(list(names), "named by hand", position)
    chosen = sorted(others, key=lambda p: position[p])[:n]
    return PersonaChoice(chosen, f"the {len(chosen)} stored personas farthest from {base!r} on "
                         f"its axis at layer {layer} (mean standardised projection over "
                         f"{len(recipes)} recipes; lowest first)", position)


def choose_clean(personas: list[Persona], keep: str | None, n: int, names: list[str] | None,
                 store: ActivationSource | None) -> tuple[list[Persona], str]:
    """Clean personas (with ``keep``, the corrupt persona, in front) and why they were chosen:
    ``names`` as given; else, with a store that holds ``keep`` (or the ``assistant`` persona
    for ``--corrupt next``), the ``n`` stored personas farthest from it on its axis, as
    ``tlpersona steer`` chooses them; else the first ``n`` of the list."""
    if n < 1:
        raise TlpersonaError("`n_personas` must be at least 1")
    by_name = {p.name: p for p in personas}
    if keep is not None and keep not in by_name:
        raise TlpersonaError(f"persona {keep!r} is not among the personas")
    base = keep or "assistant"
    if names:
        missing = [x for x in names if x not in by_name]
        if missing:
            raise TlpersonaError(f"`clean_personas`: {missing[0]!r} is not among the personas")
        picked, note = names, "named by hand"
    elif store is not None and base in store.personas and all(x in by_name for x in store.personas):
        layer = store.layers[(len(store.layers) - 1) // 2]
        picked = choose_personas(store, base, n, None, default_recipes(store), layer).names
        note = (f"the {len(picked)} stored personas farthest from {base!r} on its axis at layer "
                f"{layer} (mean standardised projection over the stored recipes), as `steer` "
                "chooses them: contrasting personas give the largest clean-corrupt differences")
    else:
        picked = [p.name for p in personas if p.name != keep][:n]
        note = (f"the first {len(picked)} of the list (no store with {base!r} to rank them by "
                "contrast)")
    head = [by_name[keep]] if keep is not None else []
    return head + [by_name[x] for x in picked if x != keep], note
