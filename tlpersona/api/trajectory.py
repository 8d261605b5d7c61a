"""Drift along a persona axis or a shared PC, per assistant turn and per token, against the band
the stored personas occupy (see :mod:`tlpersona.analyses.trajectory` and
docs/methods/trajectory.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tlpersona.analyses.projection import Frame, axis_frame, pc_frame
from tlpersona.analyses.trajectory import (
    Band,
    ConversationTrajectory,
    band,
    check_percentiles,
    flag_line,
    token_values,
    trace,
)
from tlpersona.cache.reader import Store
from tlpersona.cache.source import as_store, stored_layer
from tlpersona.chat.positions import canonical
from tlpersona.data import Inputs, Persona, builtin_personas, persona_hash
from tlpersona.errors import TlpersonaError
from tlpersona.extraction.tokens import Conversation, check_conversation
from tlpersona.infra.reading import jsonl_lines, read_text, strict_json
from tlpersona.infra.resultjson import Reader as _Reader
from tlpersona.infra.resultsets import results_set
from tlpersona.models.loading import LoadedModel
from tlpersona.version import __version__

#: The recipe whose stored readings are of a turn's kind (a mean over an assistant response's
#: tokens), used when it is stored and no `position` is given.
DEFAULT_POSITION = "response_mean"
#: Recipes whose stored readings are means over a response's tokens, as a turn's value is.
RESPONSE_POOLED = ("response_mean", "response_mean_seed")


# --- conversations ---------------------------------------------------------------------------

def _conversation(obj: object, where: str, label: str) -> Conversation:
    """A conversation from one JSON value: a list of chat messages, or an object with
    ``messages`` and optionally ``persona`` and ``label``."""
    persona = None
    if isinstance(obj, dict):
        extra = sorted(set(obj) - {"messages", "persona", "label"})
        if extra:
            raise TlpersonaError(f"{where}: unknown key {extra[0]!r} (messages, persona, label)")
        if "messages" not in obj:
            raise TlpersonaError(f"{where}: an object needs 'messages'")
        persona, label = obj.get("persona"), obj.get("label", label)
        if persona is not None and not isinstance(persona, str):
            raise TlpersonaError(f"{where}: 'persona' must be a persona name")
        if not isinstance(label, str):
            raise TlpersonaError(f"{where}: 'label' must be a string")
        obj = obj["messages"]
    if not isinstance(obj, list):
        raise TlpersonaError(f"{where}: expected a list of chat messages or an object with "
                             "'messages'")
    return Conversation.of(obj, label, persona, where)


def load_conversations(path: str | Path) -> list[Conversation]:
    """Conversations from a JSONL file: each line a list of chat messages (``role`` system, user
    or assistant, ``content``; any number of turns, a system message only first, at least one
    assistant turn) or an object ``{"messages": [...], "persona": NAME, "label": TEXT}``
    (``persona``: the stored persona whose band the turns are held to). Blank lines are skipped;
    every problem is one line naming ``path:line``."""
    p = Path(path)
    out: list[Conversation] = []
    for n, line in enumerate(jsonl_lines(read_text(p, "conversations JSONL file")), 1):
        if not line.strip():
            continue
        try:
            obj = strict_json(line)
        except ValueError as exc:
            raise TlpersonaError(f"{p}:{n}: invalid JSON ({exc})") from None
        out.append(_conversation(obj, f"{p}:{n}", f"conversation:{len(out) + 1}"))
    if not out:
        raise TlpersonaError(f"{p}: no conversations")
    return out


def builtin_conversations() -> list[Conversation]:
    """The two built-in multi-turn conversations: the assistant drawn into role-play, and a
    pirate asked for plain technical help."""
    raw = json.loads(resources.files("tlpersona.data").joinpath("builtin_conversations.json")
                     .read_text())
    return [_conversation(c, f"builtin conversation {i + 1}", f"conversation:{i + 1}")
            for i, c in enumerate(raw)]


# --- the frame and the bands (no model) ------------------------------------------------------

def _pc_components(st: Store, position: str, layer: int, subspace: str | Path | None
                   ) -> tuple[np.ndarray, bool]:
    """Shared PCs ``[k, d]`` at ``layer`` and whether they were fitted on unit-norm recipes: from
    a saved subspace result (``subspace``, checked to be this store's), else fitted on the
    store's recipes exactly as :func:`tlpersona.subspace` fits them."""
    from sklearn.decomposition import PCA

    from tlpersona.analyses.compare import default_positions
    from tlpersona.analyses.kfound import prepare

    if subspace is not None:
        from tlpersona.api.results import SubspaceResult

        if not Path(subspace).exists():
            raise TlpersonaError(f"`subspace` {subspace}: no such directory")
        sub = SubspaceResult.load(subspace)
        if sub.to_dict().get("input", {}).get("manifest_hash") != st.manifest_hash:
            raise TlpersonaError(f"`subspace` {subspace} was computed on another store")
        if layer not in sub.components:
            raise TlpersonaError(f"`subspace` {subspace} has no layer {layer} (it has "
                                 f"{sorted(sub.components)})")
        if position not in sub.positions:
            raise TlpersonaError(f"`position` {position} is not one of the recipes the PCs in "
                                 f"`subspace` were fitted on ({', '.join(sub.positions)})")
        return sub.components[layer], sub.unit_norm
    positions = default_positions(list(st.positions))
    if position not in positions or len(positions) < 2:
        raise TlpersonaError(f"`position` {position} is not one of the recipes the shared PCs are "
                             f"fitted on ({', '.join(positions) or 'none stored'}); give `subspace`"
                             " (a subspace output fitted on it)")
    if len(st.personas) < 4:
        raise TlpersonaError(f"shared PCs need at least 4 personas, not {len(st.personas)}")
    li = st.layer_index(layer)
    stacked = np.concatenate([prepare(st.centroids(p)[:, li].double().numpy(), True)
                              for p in positions])
    k_max = min(50, stacked.shape[0] - 1, stacked.shape[1])
    return PCA(n_components=k_max, svd_solver="full").fit(stacked).components_, True


def axis_frame_of(store: Store | str | Path, axis: str, position: str, layer: int,
                  subspace: str | Path | None = None) -> Frame:
    """The one-axis frame of ``position`` at ``layer`` (a stored block number): ``axis``
    ``persona:NAME`` (NAME's centroid minus the other personas' mean, unit length, as
    :func:`tlpersona.project` uses it) or ``pc:K`` (shared PC K, 1 first; from ``subspace``, a
    saved subspace output of this store, else fitted as :func:`tlpersona.subspace` does).
    Coordinates are centred on the stored personas' mean centroid."""
    st = as_store(store)
    cent = st.centroids(position)[:, st.layer_index(layer)].double().numpy()
    if axis.startswith("persona:"):
        name = axis.split(":", 1)[1]
        if name not in st.personas:
            raise TlpersonaError(f"`axis` persona {name!r} is not in the store (it has "
                                 f"{', '.join(st.personas[:8])}{' …' if len(st.personas) > 8 else ''})")
        if subspace is not None:
            raise TlpersonaError("`subspace` goes with a `axis` pc:K, not a persona axis")
        return axis_frame(cent, st.personas, name)
    if axis.startswith("pc:"):
        try:
            k = int(axis.split(":", 1)[1])
        except ValueError:
            raise TlpersonaError(f"`axis` {axis!r}: pc:K takes a PC number (pc:1, pc:2 …)") from None
        if k < 1:
            raise TlpersonaError(f"`axis` {axis!r}: PCs are numbered from 1")
        comps, unit_norm = _pc_components(st, position, layer, subspace)
        if k > comps.shape[0]:
            raise TlpersonaError(f"`axis` {axis!r}: only {comps.shape[0]} shared PCs exist here")
        full = pc_frame(cent, comps, k, unit_norm)
        return Frame(full.mean, full.scale, comps[k - 1][None], [f"PC{k}"])
    raise TlpersonaError(f"unknown `axis` {axis!r} (persona:NAME or pc:K)")


def _own_band(st: Store, frame: Frame, position: str, layer: int, persona: str,
              percentiles: tuple[float, float]) -> Band | None:
    """``persona``'s band from its per-question readings (valid rows), None where the recipe
    stores one reading per persona or fewer than 2 are valid."""
    if not st.has_per_question(position):
        return None
    i = st.personas.index(persona)
    rows = st.per_question_rows(position, i, i + 1)[0, :, st.layer_index(layer)]  # [q, d] fp16
    rows = rows[st.valid(position)[i]]
    if rows.shape[0] < 2:
        return None
    return band(frame.coords(rows.double().numpy())[:, 0], percentiles)


def _prompt_owners(st: Store, personas: Sequence[Persona] | None) -> tuple[dict[str, str], str | None]:
    """System prompt text → stored persona, from ``personas`` (default: the built-in set) where
    they are the set the store was made with; given personas that are not are an error, the
    default set that is not gives no matches and a note."""
    from tlpersona.api.analysis import stored_items

    try:
        stored = stored_items(st.personas, builtin_personas() if personas is None else personas,
                              lambda p: p.name, persona_hash, st.provenance.get("persona_hash"),
                              "personas", "persona", "their system prompts differ")
    except TlpersonaError:
        if personas is not None:
            raise
        return {}, ("system messages were not matched to stored personas: the store was not made "
                    "with the built-in personas (give `personas`, or each conversation's persona)")
    owners: dict[str, str] = {}
    for p in stored:
        for s in p.system_prompts:
            owners.setdefault(s.strip(), p.name)
    return owners, None


@dataclass(frozen=True)
class _Plan:
    """Everything checked and computed before the model loads."""

    store: Store
    axis: str
    frame: Frame
    position: str
    layer: int
    percentiles: tuple[float, float]
    subspace: str | None
    stored: dict[str, float]
    stored_band: Band
    conversations: list[Conversation]  # labelled, persona resolved
    own: dict[str, Band | None]
    notes: list[str]


def _plan(store: Store | str | Path, conversations: Sequence[Conversation] | None, axis: str,
          position: str | None, layer: int | None, subspace: str | Path | None,
          personas: Sequence[Persona] | None, percentiles: Sequence[float]) -> _Plan:
    st = as_store(store)
    pct = check_percentiles(percentiles)
    if len(st.personas) < 2:
        raise TlpersonaError(f"a trajectory needs a store of at least 2 personas, not {len(st.personas)}")
    # the built-in ones name their personas: held to them only where the store has them
    convs = ([replace(c, persona=c.persona if c.persona in st.personas else None)
              for c in builtin_conversations()] if conversations is None else list(conversations))
    if not convs:
        raise TlpersonaError("`conversations` is empty")
    if position is None:
        position = (DEFAULT_POSITION if DEFAULT_POSITION in st.positions
                    else next((p for p in st.positions if p != "first"), st.positions[0]))
    position = canonical(position)
    st.centroids(position)  # one line for a position the store lacks
    layer = stored_layer(st, layer) if layer is not None else st.layers[len(st.layers) // 2]
    frame = axis_frame_of(st, axis, position, layer, subspace)
    values = frame.coords(st.centroids(position)[:, st.layer_index(layer)].double().numpy())[:, 0]
    notes: list[str] = []
    if position not in RESPONSE_POOLED:
        notes.append(f"{position}'s stored readings are not a mean over a response's tokens, as a "
                     "turn's value is: the bands hold another kind of reading than the turns")
    owners: dict[str, str] = {}
    if any(c.persona is None and c.system is not None for c in convs):
        owners, note = _prompt_owners(st, personas)
        notes += [note] if note else []
    labelled = []
    for i, c in enumerate(convs):
        where = c.origin or f"`conversations`[{i}]" + (f" ({c.label})" if c.label else "")
        check_conversation(c, where)
        if c.persona is not None and c.persona not in st.personas:
            raise TlpersonaError(f"{where}: persona {c.persona!r} is not in the store")
        persona = c.persona or (owners.get(c.system.strip()) if c.system else None)
        labelled.append(replace(c, label=c.label or f"conversation:{i + 1}", persona=persona))
    own = {p: _own_band(st, frame, position, layer, p, pct)
           for p in dict.fromkeys(c.persona for c in labelled if c.persona is not None)}
    if any(b is None for b in own.values()):
        notes.append(f"no own band for {', '.join(p for p, b in own.items() if b is None)}: "
                     + (f"{position} stores one reading per persona (it does not read the "
                        f"question), so no turn is flagged; {DEFAULT_POSITION} gives per-question "
                        "bands" if not st.has_per_question(position)
                        else "fewer than 2 valid per-question readings"))
    return _Plan(st, axis, frame, position, layer, pct, None if subspace is None else str(subspace),
                 dict(zip(st.personas, map(float, values), strict=True)), band(values, pct),
                 labelled, own, notes)


# --- the run ---------------------------------------------------------------------------------

def _model(model: str | LoadedModel | None, st: Store, device: str | None,
           dtype: str | None) -> LoadedModel:
    from tlpersona.models.loading import default_device, load_model

    lm = (model if isinstance(model, LoadedModel)
          else load_model(model or st.provenance["model"], device or default_device(), dtype))
    if lm.info.identity != st.provenance.get("model_identity"):
        raise TlpersonaError(f"`model` {lm.info.spec} is not the model this store was made with")
    return lm


def _what(plan: _Plan) -> str:
    return f"{plan.frame.names[0]}, L{plan.layer} {plan.position}"


def _run(plan: _Plan, lm: LoadedModel, batch_size: int | None) -> TrajectoryResult:
    from tlpersona.chat.template import ChatRenderer
    from tlpersona.extraction.tokens import TokenReader, render_conversation

    renderer = ChatRenderer(lm.tokenizer)
    rendered = [render_conversation(renderer, c, c.label) for c in plan.conversations]
    n_ctx = lm.bridge.cfg.n_ctx
    for c, r in zip(plan.conversations, rendered, strict=True):
        if n_ctx and len(r.ids) > n_ctx:
            raise TlpersonaError(f"{c.label}: {len(r.ids)} tokens, longer than the model's "
                                 f"context ({n_ctx})")
    resid = TokenReader(lm, [plan.layer], batch_size).residuals([r.ids for r in rendered])
    out, flags = [], []
    for c, r, x in zip(plan.conversations, rendered, resid, strict=True):
        values = token_values(plan.frame, x[:, 0].double().numpy())
        own = plan.own.get(c.persona) if c.persona is not None else None
        msgs = [(m.role, m.content, s.start, s.stop)
                for m, s in zip(c.messages, r.spans, strict=True)]
        conv = trace(c.label, c.persona, own, plan.stored_band, msgs, r.ids,
                     [lm.tokenizer.decode([i]) for i in r.ids], values)
        out.append(conv)
        if own is not None and c.persona is not None:
            flags += [line for t in conv.turns
                      if (line := flag_line(c.label, t, c.persona, own, _what(plan)))]
    st = plan.store
    prov = st.provenance
    inputs = Inputs(prov.get("model_identity"), prov.get("persona_hash"),
                    prov.get("question_hash"), st.manifest_hash)
    return TrajectoryResult(str(st.root), inputs, plan.axis, plan.frame.names[0], plan.position,
                            plan.layer, plan.percentiles, plan.stored, plan.stored_band, out, flags,
                            plan.notes, plan.subspace)


def trajectory(store: Store | str | Path, model: str | LoadedModel | None = None,
               conversations: Sequence[Conversation] | None = None, *,
               axis: str = "persona:assistant", position: str | None = None,
               layer: int | None = None, subspace: str | Path | None = None,
               personas: Sequence[Persona] | None = None,
               band: Sequence[float] = (5.0, 95.0), batch_size: int | None = None,
               device: str | None = None, dtype: str | None = None) -> TrajectoryResult:
    """How ``conversations`` (multi-turn :class:`Conversation`; None: the two built-in ones,
    each held to its persona where the store has it) move along ``axis`` turn by turn and token by token.

    Every conversation goes through the store's model once (``model`` overrides it; it must be
    the same model), batched; every token's ``blocks.{layer}.hook_resid_post`` is projected onto
    ``axis`` in ``position``'s projection frame (default: response_mean where stored, whose
    readings are a turn's kind; ``layer`` default: the middle stored layer, as in
    :func:`tlpersona.project`): ``persona:NAME`` (NAME minus the other personas' mean) or
    ``pc:K`` (shared PC K; ``subspace``: a saved subspace output of this store, else fitted as
    :func:`tlpersona.subspace` does). An assistant turn's value is the mean over its content
    tokens. Bands (``band`` percentiles, by order statistics): the stored personas' centroids,
    and per conversation its own persona's per-question readings, the persona named in the
    conversation or found from its system message among ``personas`` (the set the store was made
    with; default the built-in one). A turn outside its own band is flagged in one line, with
    the rate at which a turn like those readings would be. Every input is checked before the
    model loads. ``.save(out)`` writes trajectory.json, trajectory.csv (turns), tokens.csv,
    figures/ and trajectory.md."""
    from tlpersona.infra.checks import check_count

    check_count(batch_size, "`batch_size`", 1)
    plan = _plan(store, conversations, axis, position, layer, subspace, personas, band)
    return _run(plan, _model(model, plan.store, device, dtype), batch_size)


def builtin_trajectory(store: Store | str | Path, model: str | LoadedModel | None = None
                       ) -> TrajectoryResult:
    """The built-in conversations on the store's assistant axis (its first persona's where it
    has no ``assistant``), each held to its persona's band where the store has that persona:
    the experiment's trajectory section."""
    st = as_store(store)
    base = "assistant" if "assistant" in st.personas else st.personas[0]
    return trajectory(st, model, None, axis=f"persona:{base}")


# --- the result ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrajectoryResult:
    """What :func:`tlpersona.trajectory` computed; ``.to_dict()`` is trajectory.json.

    ``stored``: each stored persona's centroid on the axis; ``stored_band``: where they lie;
    ``conversations``: per conversation every token's value, every assistant turn's, and its own
    persona's band; ``flags``: one line per turn outside its own persona's band."""

    store: str
    inputs: Inputs
    axis: str  # persona:NAME or pc:K
    axis_name: str  # the coordinate's name ("assistant axis", "PC1")
    position: str  # the recipe whose frame, axis and bands are used
    layer: int
    band: tuple[float, float]  # the bands' percentiles
    stored: dict[str, float] = field(repr=False)
    stored_band: Band = field(repr=False)
    conversations: list[ConversationTrajectory] = field(repr=False)
    flags: list[str] = field(repr=False)
    notes: list[str] = field(default_factory=list, repr=False)
    subspace: str | None = None  # the subspace output the PCs came from (None: fitted here)
    code_version: str = field(default=__version__, repr=False)  # the version that computed it

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def to_frame(self) -> Any:
        """One row per assistant turn (its conversation's number, label and persona, the turn's
        number, tokens, value and side of each band) as a pandas DataFrame."""
        from tlpersona.infra.resultjson import frame

        return frame({"conversation": n, "label": c.label, "persona": c.persona, **asdict(t)}
                     for n, c in enumerate(self.conversations, 1) for t in c.turns)

    def __repr__(self) -> str:
        turns = sum(len(c.turns) for c in self.conversations)
        return (f"TrajectoryResult({len(self.conversations)} conversations, {turns} assistant "
                f"turns on the {self.axis_name} at L{self.layer} ({self.position}); "
                f"{len(self.flags)} flagged)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def answer(self) -> str:
        """One sentence: which conversations' assistant turns leave their own persona's band
        (descriptive, at each band's outside rate), or why none can be held to one."""
        held = [c for c in self.conversations if c.own_band is not None]
        where = f"on the {self.axis_name} (L{self.layer}, {self.position})"
        if not held:
            return (f"No conversation could be held to its own persona's band {where}: "
                    + (self.notes[-1] if self.notes else "none names a stored persona") + ".")
        parts = []
        for c in held:
            out = [t for t in c.turns if t.own not in (None, "inside")]
            parts.append(f"{c.label} ({c.persona}): "
                         + (f"turn{'s' if len(out) > 1 else ''} "
                            f"{', '.join(str(t.index) for t in out)} of {len(c.turns)} "
                            f"{'leaves' if len(out) == 1 else 'leave'} its band"
                            if out else f"all {len(c.turns)} turns inside its band"))
        rate = max(c.own_band.outside_rate for c in held if c.own_band is not None)
        return (f"Assistant turns {where} against their own persona's per-question band: "
                + "; ".join(parts) + f" (a turn like those readings lands outside at ≤ {rate:.2f}; "
                "descriptive, no correction over turns).")

    @classmethod
    def load(cls, path: str | Path) -> TrajectoryResult:
        """A saved trajectory: ``path`` is its trajectory.json or the directory holding it."""
        path = Path(path)
        file = path / "trajectory.json" if path.is_dir() else path
        if path.is_dir() and not file.exists():
            raise TlpersonaError(f"{path}: no trajectory.json in this directory (not a saved "
                                 "trajectory result)")
        try:
            data = strict_json(read_text(file, "trajectory result (trajectory.json)"))
        except ValueError as exc:
            raise TlpersonaError(f"{file}: invalid JSON ({exc})") from None
        if not isinstance(data, dict) or not {"conversations", "stored_band"} <= set(data):
            raise TlpersonaError(f"{file} is not a trajectory result")
        return _Reader(file, data.get("code_version")).dataclass(cls, data, "")

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """trajectory.json, trajectory.csv (one row per assistant turn), tokens.csv (one per
        token), figures/ and trajectory.md into ``out`` (one set, swapped in whole; earlier
        results there only with ``overwrite``); returns trajectory.md's path."""
        from tlpersona.report.html import write_html
        from tlpersona.report.trajectory import write_trajectory

        with results_set(out, "trajectory", overwrite, finish=write_html) as stage:
            write_trajectory(self, stage)
        return Path(out) / "trajectory.md"
