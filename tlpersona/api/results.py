"""The typed results of the API calls, under the names the front door gives them. Each class
is defined once, beside the analysis or experiment that builds it: ``.to_dict()`` (exactly the
JSON the CLI writes), ``.save(out_dir)`` (JSON, report, figures) and ``Result.load(path)``
(a saved result back, from its JSON file or the directory holding it)."""

from tlpersona.analyses.compare.result import CompareResult, PairCell
from tlpersona.analyses.projection import Projected, ProjectionResult
from tlpersona.analyses.subspace_result import KFound, SubspaceLayer, SubspaceResult
from tlpersona.infra.resultsets import results_set
from tlpersona.interventions.patching import PatchResult
from tlpersona.interventions.steering import SteeringResult

__all__ = ["CompareResult", "KFound", "PairCell", "PatchResult", "Projected", "ProjectionResult",
           "SteeringResult", "SubspaceLayer", "SubspaceResult", "results_set"]
