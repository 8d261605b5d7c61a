"""The store's on-disk names, in one place.

::

    DIR/manifest.json                    provenance, file list (sha256, tensor shapes), complete
    DIR/<position>.safetensors           centroids [persona, layer, d] fp32
                                         per_question [persona, question, layer, d] fp16
                                         valid [persona, question] uint8
                                         n_tokens [persona, question] fp32 (pooled positions)
    DIR/parts/<start>-<stop>.safetensors one group of personas while a run is unfinished:
                                         "<persona index>/<position>/<kind>" per tensor
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
