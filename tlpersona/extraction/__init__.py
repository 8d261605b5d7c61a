"""Extraction: the device engine (one bridge forward per batch, pooled into every position on
the device) and runs of it into a store (provenance, resume, torchrun ranks)."""

from tlpersona.extraction.engine import (
    ExtractConfig,
    Extractor,
    PassPlan,
    PersonaResult,
    Pooled,
    Prepared,
)
from tlpersona.extraction.run import (
    extract_to_store,
    overlap_groups,
    provenance,
    provenance_of,
    responses_digest,
    schedule_groups,
)

__all__ = ["ExtractConfig", "Extractor", "PassPlan", "PersonaResult", "Pooled", "Prepared",
           "extract_to_store", "overlap_groups", "provenance", "provenance_of",
           "responses_digest", "schedule_groups"]
