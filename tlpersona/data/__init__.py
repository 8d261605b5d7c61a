"""Personas and questions: the built-in set and the assistant-axis directory format.

assistant-axis layout (what our users already have)::

    DIR/role_list.json                 {"role": "one-line description", ...}
    DIR/instructions/<role>.json       {"instruction": [{"pos": "<system prompt>"}, ...], ...}
    questions.jsonl                    {"question": "...", "id": ...} per line
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tlpersona.errors import TlpersonaError
from tlpersona.infra.checks import check_count
from tlpersona.infra.paths import check_persona_names
from tlpersona.infra.reading import jsonl_lines, read_text, strict_json


@dataclass(frozen=True)
class Persona:
    name: str
    system_prompts: tuple[str, ...]


@dataclass(frozen=True)
class Question:
    id: str
    text: str


def _read_json(path: Path) -> object:
    text = read_text(path, "JSON file")
    try:
        return strict_json(text)
    except ValueError as exc:  # JSONDecodeError, or a duplicate key
        raise TlpersonaError(f"{path}: invalid JSON ({exc})") from None


def _check_persona(name: str, prompts: list[object], where: str) -> Persona:
    if not prompts:
        raise TlpersonaError(f"{where}: persona {name!r} has no system prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise TlpersonaError(f"{where}: persona {name!r} has an empty system prompt (#{i})")
    return Persona(name, tuple(str(p) for p in prompts))


def builtin_personas() -> list[Persona]:
    raw = json.loads(resources.files("tlpersona.data").joinpath("builtin_personas.json").read_text())
    check_persona_names(raw, "builtin personas")
    return [_check_persona(name, prompts, "builtin") for name, prompts in raw.items()]


def builtin_questions() -> list[Question]:
    raw = json.loads(resources.files("tlpersona.data").joinpath("builtin_questions.json").read_text())
    return [Question(f"q{i:03d}", text) for i, text in enumerate(raw)]


def load_assistant_axis_personas(directory: str | Path, param: str = "personas") -> list[Persona]:
    """Read an assistant-axis persona directory.

    ``role_list.json`` is one JSON object whose keys are the role (persona) names, in the order
    the personas take in a store; each value, by convention a one-line description, is not
    read. Duplicate keys are refused, and so are names that cannot be file names (empty, with a
    path separator, control characters or surrounding white space, starting with a dot, longer
    than 200 UTF-8 bytes, ``all_centroids``, ``metadata`` or ending in ``__per_q`` in any case)
    or that equal another ignoring case. Every listed role needs ``instructions/<role>.json``: an object whose
    ``instruction`` list holds ``{"pos": "<system prompt>"}`` items, each a non-empty string;
    the i-th is the phrasing ``prompt_index`` i selects. Other keys there (``questions``,
    ``eval_prompt``, an item's ``neg``) are ignored, and so are files of roles not listed
    (``default.json``).
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise TlpersonaError(f"`{param}` {root}: not a directory (expected role_list.json and "
                             "instructions/ inside)")
    roles = _read_json(root / "role_list.json")
    if not isinstance(roles, dict) or not roles:
        raise TlpersonaError(f"{root / 'role_list.json'}: expected a non-empty object of roles")
    # a role name becomes a file name here and in exports: check it before joining paths
    check_persona_names(roles, str(root / "role_list.json"))
    out = []
    for role in roles:
        path = root / "instructions" / f"{role}.json"
        if not path.exists():
            raise TlpersonaError(f"role {role!r} has no file {path}")
        data = _read_json(path)
        items = data.get("instruction") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise TlpersonaError(f"{path}: no 'instruction' list")
        prompts = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "pos" not in item:
                raise TlpersonaError(f"{path}: instruction #{i} has no 'pos'")
            prompts.append(item["pos"])
        out.append(_check_persona(role, prompts, str(path)))
    return out


def load_questions_jsonl(path: str | Path) -> list[Question]:
    """Read ``{"question": ..., "id": ...}`` lines; ids must be unique."""
    p = Path(path)
    out: list[Question] = []
    seen: set[str] = set()
    for lineno, line in enumerate(jsonl_lines(read_text(p, "questions JSONL file")), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TlpersonaError(f"{p}:{lineno}: invalid JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise TlpersonaError(f"{p}:{lineno}: expected an object with a 'question' string")
        if not row["question"].strip():
            raise TlpersonaError(f"{p}:{lineno}: empty question")
        qid = str(row.get("id", lineno - 1))
        if qid in seen:
            raise TlpersonaError(f"{p}:{lineno}: duplicate question id {qid!r}")
        seen.add(qid)
        out.append(Question(qid, row["question"]))
    if not out:
        raise TlpersonaError(f"{p}: no questions")
    return out


def load_personas(spec: str, limit: int | None = None, param: str = "personas") -> list[Persona]:
    """``builtin`` or an assistant-axis directory; ``limit`` keeps the first N. ``param``: the
    caller's name for ``spec`` in error messages."""
    check_count(limit, "`limit_personas`", 0)
    personas = (builtin_personas() if spec == "builtin"
                else load_assistant_axis_personas(spec, param))
    return personas[:limit] if limit else personas


def load_questions(spec: str, limit: int | None = None) -> list[Question]:
    """``builtin`` or a questions JSONL file; ``limit`` keeps the first N."""
    check_count(limit, "`limit_questions`", 0)
    questions = builtin_questions() if spec == "builtin" else load_questions_jsonl(spec)
    return questions[:limit] if limit else questions


def indexed_prompts(persona: Persona, prompt_index: int | str) -> list[tuple[int, str]]:
    """The phrasings to use with their index in the persona's list: one (``prompt_index`` N)
    or all of them (``"all"``, averaged). The index is what responses are keyed by."""
    if prompt_index == "all":
        return list(enumerate(persona.system_prompts))
    idx = int(prompt_index)
    if not 0 <= idx < len(persona.system_prompts):
        raise TlpersonaError(
            f"persona {persona.name!r} has {len(persona.system_prompts)} prompts; "
            f"`prompt_index` {idx} is out of range"
        )
    return [(idx, persona.system_prompts[idx])]


def system_prompt(persona: Persona, prompt_index: int) -> str:
    """The one phrasing at ``prompt_index`` (same range check as :func:`indexed_prompts`)."""
    return indexed_prompts(persona, prompt_index)[0][1]


def content_hash(obj: object) -> str:
    """Stable sha256 of a JSON-serialisable object (for manifests)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def persona_hash(personas: list[Persona]) -> str:
    """What a store records of its personas: names and every system-prompt phrasing, in order."""
    return content_hash([[p.name, list(p.system_prompts)] for p in personas])


def question_hash(questions: list[Question]) -> str:
    """What a store records of its questions: ids and texts, in order."""
    return content_hash([[q.id, q.text] for q in questions])


@dataclass(frozen=True)
class Inputs:
    """What shaped a result besides its settings, so that a result file names exactly what it
    was computed from: the model's identity (file hash, revision or config hash), hashes of the
    persona prompts (:func:`persona_hash`) and questions (:func:`question_hash`) it ran on, and
    the manifest hash of the store it read (None: none)."""

    model_identity: str | None  # None: the store does not record it
    persona_hash: str | None
    question_hash: str | None
    store_manifest_hash: str | None = None

    @classmethod
    def of(cls, model_identity: str, personas: list[Persona], questions: list[Question],
           store_manifest_hash: str | None = None) -> Inputs:
        return cls(model_identity, persona_hash(personas), question_hash(questions),
                   store_manifest_hash)
