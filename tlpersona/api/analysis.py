"""Analyses that read activations only: compare, subspace, project."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch

from tlpersona.analyses.compare import CompareConfig
from tlpersona.analyses.compare import compare as _compare
from tlpersona.analyses.compare.result import CompareResult, Thresholds
from tlpersona.analyses.projection import Projected, ProjectionResult
from tlpersona.analyses.subspace import SubspaceConfig
from tlpersona.analyses.subspace import subspace as _subspace
from tlpersona.analyses.subspace_result import SubspaceResult
from tlpersona.cache.export import VectorExport, check_export
from tlpersona.cache.reader import Store
from tlpersona.cache.source import ActivationSource, as_store, open_source, stored_layer, stored_layers
from tlpersona.cache.vectors import PersonaVector, Reference
from tlpersona.chat.positions import canonical, parse_positions
from tlpersona.data import Question
from tlpersona.errors import TlpersonaError
from tlpersona.infra.checks import check_count
from tlpersona.infra.paths import check_new_file
from tlpersona.models.loading import LoadedModel

T = TypeVar("T")


def _recipes(positions: Sequence[str] | None) -> list[str] | None:
    """Canonical names of ``positions`` (groups and aliases expanded); None stays None."""
    return None if positions is None else [p.name for p in parse_positions(list(positions))]


def compare(source: ActivationSource | str | Path, *, layers: Sequence[int] | None = None,
            positions: Sequence[str] | None = None, permutations: int | None = None, seed: int = 0,
            splits: int = 10, null_draws: int = 100,
            thresholds: Thresholds | None = None) -> CompareResult:
    """Compare the recipes of ``source`` (a store, a seed-layout directory, or a path to one).

    For every stored layer (or ``layers``) × pair of ``positions`` (default: the seven recipes
    present): per-persona cosines, mean-centred persona-geometry correlation with a Mantel null
    (``permutations``; None: 2 × cells / alpha, at least 1000, so that Holm over every cell can
    reach alpha), held-out Procrustes cosine with a relabelled null (``null_draws``),
    split-half ceilings (``splits`` question halvings), spread, Holm-adjusted p-values, PASS /
    GREY / KILL verdicts under ``thresholds`` and the groups of recipes that agree.
    ``.save(out)`` writes results.json, figures and report.md.
    """
    check_count(permutations, "`permutations`", 1)
    check_count(null_draws, "`null_draws`", 1)
    check_count(splits, "`splits`", 1)
    src = open_source(source)
    cfg = CompareConfig(positions=_recipes(positions), layers=stored_layers(src, layers),
                        permutations=permutations, seed=seed, splits=splits,
                        null_draws=null_draws, thresholds=thresholds or Thresholds())
    return _compare(src, cfg)


def subspace(source: ActivationSource | str | Path, *, layers: Sequence[int] | None = None,
             positions: Sequence[str] | None = None, k_max: int = 50, unit_norm: bool = True,
             seed: int = 0, align: str = "none", null_draws: int = 100) -> SubspaceResult:
    """The persona subspace the recipes share: joint PCA of the stacked recipes (each scaled to
    unit total variance unless ``unit_norm=False``), and per layer ``k_found``, the number of
    shared PCs whose persona scores agree across recipes on held-out personas, tested per PC
    against label permutations of the held-out personas (an intersection–union test over recipe
    pairs), beside a descriptive count after relabelling one recipe's personas (``null_draws``,
    0 for none). ``align="procrustes"`` also rotates each recipe onto a common frame (fitted on
    the fit personas) before the PCA, so the same geometry in a rotated basis counts as shared.
    A layer's :class:`KFound` says whether it is called beyond chance after Holm over the
    layers. ``.save(out)`` writes subspace.json,
    pcs.safetensors, figures and subspace.md."""
    check_count(k_max, "`k_max`", 2)  # the figures and the matrix r need two PCs
    check_count(null_draws, "`null_draws`", 0)
    src = open_source(source)
    cfg = SubspaceConfig(positions=_recipes(positions), layers=stored_layers(src, layers),
                         k_max=k_max, unit_norm=unit_norm, seed=seed, align=align,
                         null_draws=null_draws)
    return _subspace(src, cfg)


def stored_items(ids: Sequence[str], given: Sequence[T], key: Callable[[T], str],
                 digest: Callable[[list[T]], str], want: object, param: str, kind: str,
                 differs: str) -> list[T]:
    """The items a store names by ``ids`` (its personas or questions), in its order, taken
    from ``given``, which must be the set the store was made with (``digest`` of them equal to
    the store's hash ``want``): the store keeps names and a hash, not the texts, and a result
    labelled with the store but computed on other texts would name one input and rest on
    another."""
    by_key = {key(x): x for x in given}
    missing = [i for i in ids if i not in by_key]
    if missing:
        raise TlpersonaError(f"`{param}` lacks the store's {kind} {missing[0]!r}: give the "
                             f"{kind} set the store was made with")
    stored = [by_key[i] for i in ids]
    if digest(stored) != want:
        raise TlpersonaError(f"`{param}` does not match the {kind}s the store was made with "
                             f"({differs}): give the {kind} set it was made with")
    return stored


def store_questions(st: Store, given: Sequence[Question] | None, param: str) -> list[Question]:
    """The store's questions, with their texts from ``given`` (default: the built-in set):
    an item built from other texts would not be built as the centroids were."""
    from tlpersona.data import builtin_questions, question_hash

    return stored_items(st.questions, builtin_questions() if given is None else given,
                        lambda q: q.id, question_hash, st.provenance.get("question_hash"),
                        param, "question", "their texts differ")


def item_exact(asked_store_questions: bool, question_invariant: bool, prompt_index: object) -> bool:
    """Whether a new item is built as the store's centroids are, so that its nearest-persona p
    is exact: one phrasing per persona in the store (not averaged over phrasings), and the
    store's questions averaged, unless the recipe does not read the question."""
    return prompt_index != "all" and (asked_store_questions or question_invariant)


def project(store: Store | str | Path, *, layer: int | None = None,
            positions: Sequence[str] | None = None, axis: str = "persona:assistant", k: int = 2,
            unit_norm: bool = True, systems: Sequence[tuple[str, Sequence[str]]] = (),
            conversations: Sequence[tuple[str, str]] = (), texts: Sequence[str] = (),
            model: str | LoadedModel | None = None, device: str | None = None,
            dtype: str | None = None, questions: Sequence[Question] | None = None
            ) -> ProjectionResult:
    """Project stored personas, and new material, onto shared PCs (``axis="pcs"``, the top
    ``k``) or a persona axis (``axis="persona:NAME"``: NAME minus the mean of the others), per
    recipe at ``layer`` (default: the middle stored layer).

    New material is read through the store's model (``model`` overrides it; it must be the same
    model): ``systems`` as (system prompt, questions averaged over; empty: the store's own
    questions, so the item is built as a stored centroid is and its nearest-persona p is
    exact), ``conversations`` as (system, user) messages, ``texts`` as raw text at its last
    token (raw_system_last). ``questions``: the question set the store was made with (the store
    keeps only ids and a hash; default: the built-in set), needed where a system item uses the
    store's questions. Each item gets a rank test per recipe (Holm over items × recipes) and
    one combined over its recipes (Holm over items; :class:`Combined`).
    """
    from tlpersona.analyses.projection import axis_frame, combined, nearest, pc_frame
    from tlpersona.analyses.stats import holm
    from tlpersona.data import Inputs, Persona
    from tlpersona.extraction import ExtractConfig, Extractor
    from tlpersona.models.loading import default_device, load_model

    st = as_store(store)
    # token 0 is the same for every persona: nothing to project
    names = _recipes(positions) or [p for p in st.positions if p != "first"]
    for name in names:
        st.centroids(name)  # one line for a position the store lacks
    layer = stored_layer(st, layer) if layer is not None else st.layers[len(st.layers) // 2]
    li = st.layer_index(layer)
    prompt_positions = [p for p in parse_positions(names) if not p.needs_response]
    if texts and "raw_system_last" not in names:
        raise TlpersonaError("`texts` are read with the raw_system_last recipe, which "
                             + ("`positions` does not include" if positions else
                                "this store does not have"))
    # checked before any forward pass; only needed where an item asks the store's questions
    own = store_questions(st, questions, "questions") if any(not qs for _, qs in systems) else []
    if (systems or conversations) and not prompt_positions:
        raise TlpersonaError("`systems`/`conversations` need a recipe read from the prompt; "
                             "these positions all need a response")
    cent = {p: st.centroids(p)[:, li].double().numpy() for p in names}
    if axis == "pcs":
        check_count(k, "`k`", 1)
        # the PCs only: no held-out fits or null reruns
        pcs = _subspace(st, SubspaceConfig(positions=names, layers=[layer], k_max=k,
                                           unit_norm=unit_norm, null_draws=0)).components
        comps = pcs[layer]
        if k > comps.shape[0]:
            raise TlpersonaError(f"`k` {k}: only {comps.shape[0]} shared PCs exist for "
                                 f"{len(st.personas)} personas and {len(names)} recipes")
        frames = {p: pc_frame(c, comps, k, unit_norm) for p, c in cent.items()}
    elif axis.startswith("persona:"):
        frames = {p: axis_frame(c, st.personas, axis.split(":", 1)[1]) for p, c in cent.items()}
    else:
        raise TlpersonaError(f"unknown `axis` {axis!r} (pcs or persona:NAME)")
    points = [Projected(name, p, dict(zip(f.names, map(float, c), strict=True)), True)
              for p, f in frames.items() for name, c in zip(st.personas, f.coords(cent[p]),
                                                             strict=True)]
    # (label, system, questions asked, whether they are the store's own)
    items = ([(f"system:{i}", s, [Question(str(j), q) for j, q in enumerate(qs)] or own, not qs)
              for i, (s, qs) in enumerate(systems)]
             + [(f"conversation:{i + 1}", s, [Question("0", u)], False)
                for i, (s, u) in enumerate(conversations)]
             + [(f"text:{i}", t, [], False) for i, t in enumerate(texts)])
    joint = []
    if items:
        if isinstance(model, LoadedModel):
            bridge = model
        else:
            spec = model or st.provenance["model"]
            bridge = load_model(spec, device or default_device(), dtype)
        if bridge.info.identity != st.provenance.get("model_identity"):
            raise TlpersonaError(f"`model` {bridge.info.spec} is not the model this store was "
                                 "made with")
        phrasing = st.provenance.get("prompt_index", 0)
        for label, system, qs, asked_own in items:
            pos_list = ([p for p in prompt_positions if p.kind == "raw"] if not qs
                        else prompt_positions)
            if not pos_list:
                continue
            ex = Extractor(bridge, ExtractConfig(positions=pos_list, layers=[layer], progress=False))
            res = ex.persona(Persona(label, (system,)), qs or [Question("0", ".")])
            xs, exact = {}, []
            for p in pos_list:
                x = xs[p.name] = res.centroid[p.name][0].double().numpy()
                f = frames[p.name]
                exact.append(item_exact(asked_own, p.question_invariant, phrasing))
                near = nearest(x, cent[p.name], st.personas, exact=exact[-1])
                points.append(Projected(
                    label, p.name, dict(zip(f.names, map(float, f.coords(x[None])[0]), strict=True)),
                    False, near, text=system, questions=[q.text for q in qs]))
            joint.append(combined(label, xs, cent, exact=all(exact)))
    # every new item x recipe is one question of the same run: one family
    tested = [(i, pt.nearest) for i, pt in enumerate(points) if pt.nearest is not None]
    adjusted = holm([near.p for _, near in tested])
    for (i, near), adj in zip(tested, adjusted, strict=True):
        points[i] = replace(points[i], nearest=replace(near, p_holm=float(adj), tests=len(tested)))
    # the combined test: one per item, so one family of items
    joint = [replace(c, p_holm=float(a), tests=len(joint))
             for c, a in zip(joint, holm([c.p for c in joint]), strict=True)]
    axes = next(iter(frames.values())).names
    prov = st.provenance
    inputs = Inputs(prov.get("model_identity"), prov.get("persona_hash"),
                    prov.get("question_hash"), st.manifest_hash)
    return ProjectionResult(str(st.root), layer, axis, names, list(axes), points, inputs, joint)


def persona_vector(store: Store | str | Path, persona: str, position: str, layer: int,
                   relative_to: Reference = "all") -> PersonaVector:
    """``persona``'s vector for one stored recipe and layer, with its provenance: its centroid
    minus the mean of all personas' (``"all"``, what steering adds) or of the other personas'
    (``"others"``, its axis, what projection uses)."""
    st = as_store(store)
    return st.persona_vector(persona, canonical(position), stored_layer(st, layer), relative_to)


def vector_request(persona: str, position: str, format: str, out: str | Path,
                   layers: Sequence[int] | None = None, overwrite: bool = False) -> VectorExport:
    """The checked request of :func:`export_vectors` (everything but the store: format, layers
    the format can hold, ``out``), so that a caller can refuse bad input before any write."""
    req = VectorExport(persona, canonical(position), format, Path(out),
                       list(layers) if layers is not None else None)
    check_export(req)
    check_new_file(req.out, overwrite)
    return req


def export_vectors(store: Store | str | Path, persona: str, position: str, format: str,
                   out: str | Path, layers: Sequence[int] | None = None,
                   overwrite: bool = False) -> dict[int, torch.Tensor]:
    """Write ``persona``'s vectors for one recipe where other tools load them: ``format``
    ``gguf`` (a llama.cpp control vector, ``direction.l`` = our block ``l``'s output),
    ``safetensors``/``pt`` (``{layer: tensor}``), ``npz`` or ``npy`` (one layer). ``layers``
    default to every stored layer (layer 0 left out for gguf). The file is written under a
    temporary name, then renamed (an existing ``out`` only with ``overwrite``); returns
    ``{layer: [d_model] tensor}`` as written."""
    from tlpersona.cache.export import export_vectors as write

    req = vector_request(persona, position, format, out, layers, overwrite)
    st = as_store(store)
    req.meta = {"model": str(st.provenance.get("model")), "store_manifest": st.manifest_hash}
    return write(st, req, stored_layers(st, req.layers))
