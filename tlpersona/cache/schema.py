"""The store's on-disk names, in one place.

::

    DIR/manifest.json                    provenance, file list (sha256, tensor shapes), complete
    DIR/<position>.safetensors           centroids [persona, layer, d] fp32
                                         per_question [persona, question, layer, d] fp16
                                         valid [persona, question] uint8
                                         n_tokens [persona, question] fp32 (pooled positions)
    DIR/parts/<start>-<stop>.safetensors one group of personas while a run is unfinished:
                                         "<persona index>/<position>/<kind>" per tensor

Each file also says in its own safetensors metadata what it is, so that a file swapped with
another (manifest entries and all) or left over from another run is found out: a position file
its identity (:data:`FILE_IDENTITY_KEY`), a part file the provenance of the run that wrote it
(:data:`PART_PROVENANCE`).
"""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
PARTS = "parts"
#: Tensor kinds of one persona in a part file, in the order they are written.
PART_KINDS = ("centroid", "per_question", "valid", "n_tokens")
#: A position file's tensors and their leading dimensions (``p``/``q``/``l``: personas,
#: questions, layers); the last dimension of the activations is d_model.
FILE_SHAPES = {"centroids": ("p", "l"), "per_question": ("p", "q", "l"), "valid": ("p", "q"),
               "n_tokens": ("p", "q")}
PART_FILE = re.compile(r"^\d{5}-\d{5}\.safetensors$")
#: A position file's metadata key: a JSON object (sorted keys) of what the file is. One key, so
#: that the file's bytes and sha256 are reproducible (safetensors writes several metadata keys in
#: no fixed order). Files written by earlier versions carry ``{"position": <position>}`` instead.
FILE_IDENTITY_KEY = "identity"
#: The identity's fields and what each names: the file's position, the store's layers (JSON),
#: the sha256 of its persona list (JSON) and of its provenance apart from ``responses_hash``.
FILE_IDENTITY = {"position": "position", "layers": "layers", "personas_sha256": "persona list",
                 "store_sha256": "provenance"}
#: A part file's metadata key for the provenance (JSON) of the run that wrote it.
PART_PROVENANCE = "provenance"


def position_file(position: str) -> str:
    return f"{position}.safetensors"


def part_file(start: int, stop: int) -> str:
    return f"{start:05d}-{stop:05d}.safetensors"


def persona_key(position: str, kind: str) -> str:
    """Key of one persona's tensor inside its result (``<position>/<kind>``)."""
    return f"{position}/{kind}"


def part_key(index: int, key: str) -> str:
    """Key in a part file of persona ``index``'s tensor ``key`` (a :func:`persona_key`)."""
    return f"{index}/{key}"


def file_key(kind: str) -> str:
    """Name in a position file of a part tensor kind (a persona's ``centroid`` stacks into
    ``centroids``)."""
    return "centroids" if kind == "centroid" else kind


def leading_shape(key: str, personas: int, questions: int, layers: int) -> list[int]:
    sizes = {"p": personas, "q": questions, "l": layers}
    return [sizes[d] for d in FILE_SHAPES[key]]
