"""The intervention that ``tlpersona steer`` evaluated, written where other tools apply it.

For recipe R and target persona X, steering scores ``add`` at one selected setting (block l,
strength alpha), one added vector from one position on::

    h_t  <-  h_t + alpha * s_l * v / |v|      at the output of block l, for every token t >= start

``v`` is X's centroid minus the mean centroid of every stored persona (what ``export --vectors``
writes, unscaled), ``s_l`` the layer's typical residual norm measured by that run (steering.json
``typical_norm``), and ``start`` the first token after the base persona's system block: the
system block is left as it was, and the edited run is the base persona's conversation. Block
l's output is ``blocks.l.hook_resid_post``, the output of HF's ``model.model.layers[l]``
(``hidden_states[l + 1]``) and llama.cpp's ``direction.l``.

The vector written is the one added, ``alpha * s_l * v / |v|``: applied at multiplier (scale) 1,
at layer l only, from ``start`` on, it is the evaluated intervention. One directory holds, per
persona:

* ``<persona>.safetensors``: ``{"<l>": [d_model]}`` float32, the layer as key (the steering-vectors
  library's ``layer_activations``, decoder-block index), the settings in the metadata;
* ``<persona>.pt``: ``{l: tensor}``;
* ``<persona>.gguf``: a llama.cpp control vector holding ``direction.l`` alone (written by
  :mod:`tlpersona.cache.export`; llama.cpp has no slot for layer 0);

and ``intervention.json``, every persona's settings and file names.

llama.cpp adds a control vector at every position, the system prompt and the template tokens
before it included, which steering left alone; its recommended scale is therefore 1 (the
evaluated strength) with the layer range ``l l``, an upper bound on what was evaluated rather
than the same run. ``ablate`` and ``cap`` are projections, not added vectors, and are not
exported.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tlpersona.cache.export import write_gguf
from tlpersona.cache.source import ActivationSource
from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import atomic_save_pt, atomic_save_tensors, atomic_write_bytes, atomic_write_with
from tlpersona.infra.reading import read_text, strict_json

FORMATS = ("safetensors", "pt", "gguf")
#: llama.cpp's ``--control-vector-scaled`` value that applies the vector at its evaluated strength.
LLAMACPP_SCALE = 1.0


@dataclass(frozen=True)
class EvaluatedAdd:
    """One recipe's selected ``add`` setting as steering.json records it, and how it scored."""

    recipe: str
    layer: int
    alpha: float
    typical_norm: float
    beats_random: bool
    random_p_holm: float
    rank: int
    own_effect: float


@dataclass(frozen=True)
class SteeringRecord:
    """What an export needs from a steering result: the store and model it ran on, the base
    persona and its phrasing, the steered personas, and each recipe's ``add`` setting, best
    first (rank, then own effect on the scoring questions)."""

    path: Path
    store_manifest_hash: str
    model: str
    base: str
    prompt_index: int
    targets: list[str]
    adds: list[EvaluatedAdd]


@dataclass(frozen=True)
class Intervention:
    """One persona's evaluated ``add``: ``vector`` (``[d_model]`` float32) is what was added,
    at block ``layer``'s output from token ``start`` of a conversation with the base persona's
    system prompt ``base_prompt``."""

    persona: str
    setting: EvaluatedAdd
    start: int
    start_anchor: str
    base: str
    base_prompt: str
    model: str
    store_manifest_hash: str
    vector: torch.Tensor

    @property
    def scale(self) -> float:
        """The vector's norm, ``alpha * s_l``."""
        return self.setting.alpha * self.setting.typical_norm

    def describe(self) -> dict[str, object]:
        """The settings, as intervention.json and the files' metadata hold them."""
        s = self.setting
        return {
            "persona": self.persona, "operator": "add", "recipe": s.recipe, "layer": s.layer,
            "hook": f"blocks.{s.layer}.hook_resid_post (output of HF model.layers[{s.layer}])",
            "alpha": s.alpha, "typical_norm": s.typical_norm, "scale": self.scale,
            "definition": "alpha * typical_norm * v/|v|, v = centroid(persona) - mean centroid "
                          "of all stored personas",
            "start": self.start, "start_anchor": self.start_anchor,
            "start_note": "first edited token of the base persona's conversation (the one after "
                          "its system block); earlier tokens are left as they are",
            "base": self.base, "base_system_prompt": self.base_prompt,
            "llamacpp_scale": LLAMACPP_SCALE, "llamacpp_layer_range": [s.layer, s.layer],
            "llamacpp_note": "llama.cpp adds the vector at every position, the system prompt "
                             "included, where steering started after it",
            "beats_random": s.beats_random, "random_p_holm": s.random_p_holm,
            "rank": s.rank, "own_effect": s.own_effect,
            "model": self.model, "store_manifest": self.store_manifest_hash,
        }


class _Fields:
    """Typed reads of one JSON object, each failure one line naming the file and field."""

    def __init__(self, data: object, where: str):
        if not isinstance(data, dict):
            raise TlpersonaError(f"{where}: expected an object")
        self.data, self.where = data, where

    def _get(self, key: str, kind: type | tuple[type, ...], what: str) -> object:
        value = self.data.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TlpersonaError(f"{self.where}: field {key!r} is missing or not {what}")
        return value

    def obj(self, key: str) -> _Fields:
        return _Fields(self._get(key, dict, "an object"), f"{self.where}.{key}")

    def items(self, key: str) -> list[object]:
        return list(self._get(key, list, "a list"))  # type: ignore[call-overload]

    def text(self, key: str) -> str:
        return str(self._get(key, str, "a string"))

    def integer(self, key: str) -> int:
        return int(self._get(key, int, "an integer"))  # type: ignore[call-overload]

    def number(self, key: str) -> float:
        value = float(self._get(key, (int, float), "a number"))  # type: ignore[arg-type]
        if not math.isfinite(value):
            raise TlpersonaError(f"{self.where}: field {key!r} is not finite")
        return value


def read_steering(path: str | Path) -> SteeringRecord:
    """The ``add`` settings of a steering result: ``path`` is ``tlpersona steer``'s output
    directory or its steering.json."""
    path = Path(path)
    file = path / "steering.json" if path.is_dir() else path
    try:
        top = _Fields(strict_json(read_text(file, "steering result")), str(file))
    except ValueError as exc:
        raise TlpersonaError(f"{file}: invalid JSON ({exc})") from None
    norms = top.obj("typical_norm")
    adds = []
    for i, raw in enumerate(top.items("scores")):
        score = _Fields(raw, f"{file}: scores[{i}]")
        if score.text("operator") != "add":
            continue
        setting = score.obj("setting")
        layers = setting.items("layers")
        if len(layers) != 1 or not isinstance(layers[0], int):
            raise TlpersonaError(f"{setting.where}: `add` edits one layer, not {layers}")
        p = score.data.get("random_p_holm")  # null where it was not finite
        adds.append(EvaluatedAdd(
            score.text("recipe"), layers[0], setting.number("strength"),
            norms.number(str(layers[0])), score.data.get("beats_random") is True,
            float(p) if isinstance(p, (int, float)) else float("nan"), score.integer("rank"),
            score.obj("own").obj("effect").number("mean")))
    if not adds:
        raise TlpersonaError(f"{file}: no `add` result (only `add` is an added vector; ablate "
                             "and cap are projections)")
    adds.sort(key=lambda a: (a.rank, -a.own_effect))
    return SteeringRecord(file, top.text("store_manifest_hash"), top.text("model"),
                          top.text("base"), top.obj("config").integer("prompt_index"),
                          [str(n) for n in top.obj("personas").items("names")], adds)


def choose(record: SteeringRecord, recipe: str | None, personas: list[str] | None
           ) -> tuple[EvaluatedAdd, list[str]]:
    """The recipe's setting (default: the best-ranked) and the personas (default: every steered
    one); a persona steering did not evaluate is refused."""
    by_recipe = {a.recipe: a for a in record.adds}
    if recipe is not None and recipe not in by_recipe:
        raise TlpersonaError(f"`recipe` {recipe} has no `add` result in {record.path} (it has "
                             f"{', '.join(by_recipe)})")
    wanted = list(personas) if personas else list(record.targets)
    unknown = [p for p in wanted if p not in record.targets]
    if unknown:
        raise TlpersonaError(f"`personas`: {unknown[0]!r} was not steered in {record.path} "
                             f"(steered: {', '.join(record.targets)})")
    return (by_recipe[recipe] if recipe is not None else record.adds[0]), wanted


def build(store: ActivationSource, record: SteeringRecord, setting: EvaluatedAdd,
          personas: list[str], start: tuple[int, str], base_prompt: str) -> list[Intervention]:
    """Each persona's evaluated vector, computed from ``store`` as the steering run computed it
    (``store`` must be the one it ran on)."""
    from tlpersona.interventions.steering.evaluate import added_vector, persona_directions

    if store.manifest_hash != record.store_manifest_hash:
        raise TlpersonaError(f"`store` is not the store {record.path} was computed from "
                             "(its manifest hash differs)")
    c = store.centroids(setting.recipe)[:, store.layer_index(setting.layer)]
    units = persona_directions(c, [store.personas.index(p) for p in personas])
    return [Intervention(p, setting, start[0], start[1], record.base, base_prompt, record.model,
                         record.store_manifest_hash,
                         added_vector(setting.alpha, setting.typical_norm, u).contiguous())
            for p, u in zip(personas, units, strict=True)]


def check_formats(formats: list[str], layer: int | None = None) -> None:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise TlpersonaError(f"unknown `formats` {bad[0] if bad else '(none)'!r} "
                             f"({', '.join(FORMATS)})")
    if layer == 0 and "gguf" in formats:
        raise TlpersonaError("`formats`: the evaluated layer is 0, where llama.cpp has no control "
                             "vector slot (no direction.0); leave gguf out")


def _gguf_at(tmp: str, vecs: dict[int, torch.Tensor], meta: dict[str, str]) -> None:
    write_gguf(tmp, vecs, meta)


def write(items: list[Intervention], out: Path, formats: list[str]) -> list[Path]:
    """Every persona's files and intervention.json into the directory ``out`` (each file under a
    temporary name, then renamed); returns the paths written."""
    check_formats(formats, items[0].setting.layer if items else None)
    written: list[Path] = []
    entries = []
    for it in items:
        meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in it.describe().items()}
        vecs = {it.setting.layer: it.vector}
        files = {}
        for fmt in formats:
            path = out / f"{it.persona}.{fmt}"
            if fmt == "safetensors":
                atomic_save_tensors(path, {str(la): v for la, v in vecs.items()}, meta)
            elif fmt == "pt":
                atomic_save_pt(path, dict(vecs))
            else:
                atomic_write_with(path, functools.partial(_gguf_at, vecs=vecs, meta=meta))
            files[fmt] = path.name
            written.append(path)
        entries.append({**it.describe(), "files": files})
    index = out / "intervention.json"
    atomic_write_bytes(index, json.dumps({"interventions": entries}, indent=1).encode())
    return [*written, index]
