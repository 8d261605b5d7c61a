"""tlpersona: persona vectors from chat models' residual streams, through TransformerLens.

The typed API a notebook uses (``import tlpersona as tlp``)::

    model = tlp.load_model("default")
    store = tlp.extract(model, tlp.builtin_personas()[:8], tlp.builtin_questions()[:12],
                        positions=["last", "sys_end", "prompt_mean"], layers=[7, 15],
                        out="runs/store")
    result = tlp.compare(store, permutations=1000)
    result.cell(15, "last", "sys_end").procrustes_cos
    result.save("runs/compare")  # results.json, report.md, figures

Every call takes plain Python values and returns a typed result with ``.to_dict()`` (what the
CLI writes as JSON) and ``.save(out_dir)``. Problems a user can cause raise
:class:`TlpersonaError`, naming the parameter in backticks. Layer ``l`` is the output of block
``l`` (``blocks.{l}.hook_resid_post``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tlpersona.errors import TlpersonaError
from tlpersona.version import __version__

#: public name -> module that defines it; imported on first use, so that ``tlpersona`` and its
#: CLI start without loading torch until a command needs it.
_EXPORTS = {
    "load_model": "tlpersona.models.loading",
    "LoadedModel": "tlpersona.models.loading",
    "Persona": "tlpersona.data",
    "Question": "tlpersona.data",
    "builtin_personas": "tlpersona.data",
    "builtin_questions": "tlpersona.data",
    "load_personas": "tlpersona.data",
    "load_questions": "tlpersona.data",
    "Store": "tlpersona.cache.reader",
    "open_store": "tlpersona.cache.reader",
    "PersonaVector": "tlpersona.cache.vectors",
    "ActivationSource": "tlpersona.cache.source",
    "extract": "tlpersona.api.extraction",
    "generate": "tlpersona.api.extraction",
    "write_prompts": "tlpersona.api.extraction",
    "compare": "tlpersona.api.analysis",
    "compare_models": "tlpersona.api.cross_model",
    "CrossModelResult": "tlpersona.api.cross_model",
    "subspace": "tlpersona.api.analysis",
    "project": "tlpersona.api.analysis",
    "persona_vector": "tlpersona.api.analysis",
    "export_vectors": "tlpersona.api.analysis",
    "trajectory": "tlpersona.api.trajectory",
    "TrajectoryResult": "tlpersona.api.trajectory",
    "Conversation": "tlpersona.extraction.tokens",
    "builtin_conversations": "tlpersona.api.trajectory",
    "load_conversations": "tlpersona.api.trajectory",
    "Thresholds": "tlpersona.analyses.compare.result",
    "patch": "tlpersona.api.causal",
    "steer": "tlpersona.api.causal",
    "export_intervention": "tlpersona.api.causal",
    "experiment": "tlpersona.api.experiment",
    "ExperimentResult": "tlpersona.api.experiment",
    "CompareResult": "tlpersona.api.results",
    "PairCell": "tlpersona.api.results",
    "SubspaceResult": "tlpersona.api.results",
    "SubspaceLayer": "tlpersona.api.results",
    "KFound": "tlpersona.api.results",
    "ProjectionResult": "tlpersona.api.results",
    "PatchResult": "tlpersona.api.results",
    "SteeringResult": "tlpersona.api.results",
}

__all__ = [
    "TlpersonaError",
    "__version__",
    "load_model",
    "LoadedModel",
    "Persona",
    "Question",
    "builtin_personas",
    "builtin_questions",
    "load_personas",
    "load_questions",
    "Store",
    "open_store",
    "PersonaVector",
    "ActivationSource",
    "extract",
    "generate",
    "write_prompts",
    "compare",
    "compare_models",
    "CrossModelResult",
    "subspace",
    "project",
    "persona_vector",
    "export_vectors",
    "trajectory",
    "TrajectoryResult",
    "Conversation",
    "builtin_conversations",
    "load_conversations",
    "Thresholds",
    "patch",
    "steer",
    "export_intervention",
    "experiment",
    "ExperimentResult",
    "CompareResult",
    "PairCell",
    "SubspaceResult",
    "SubspaceLayer",
    "KFound",
    "ProjectionResult",
    "PatchResult",
    "SteeringResult",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tlpersona' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from tlpersona.analyses.compare.result import Thresholds
    from tlpersona.api.analysis import compare, export_vectors, persona_vector, project, subspace
    from tlpersona.api.causal import patch, steer
    from tlpersona.api.cross_model import CrossModelResult, compare_models
    from tlpersona.api.experiment import ExperimentResult, experiment
    from tlpersona.api.extraction import extract, generate, write_prompts
    from tlpersona.api.results import (
        CompareResult,
        KFound,
        PairCell,
        PatchResult,
        ProjectionResult,
        SteeringResult,
        SubspaceLayer,
        SubspaceResult,
    )
    from tlpersona.api.trajectory import (
        TrajectoryResult,
        builtin_conversations,
        load_conversations,
        trajectory,
    )
    from tlpersona.cache.reader import Store, open_store
    from tlpersona.cache.source import ActivationSource
    from tlpersona.cache.vectors import PersonaVector
    from tlpersona.data import (
        Persona,
        Question,
        builtin_personas,
        builtin_questions,
        load_personas,
        load_questions,
    )
    from tlpersona.extraction.tokens import Conversation
    from tlpersona.models.loading import LoadedModel, load_model
