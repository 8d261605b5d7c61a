"""The flagship run: extract every recipe, compare, find the shared subspace, patch, steer, and
write one report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlpersona.analyses.compare import Thresholds
from tlpersona.api.analysis import compare, subspace
from tlpersona.api.causal import patch, steer
from tlpersona.api.extraction import PromptIndex, extract
from tlpersona.api.results import CompareResult, PatchResult, SteeringResult, SubspaceResult
from tlpersona.cache.store import Store
from tlpersona.data import Persona, Question, builtin_personas, builtin_questions
from tlpersona.files import atomic_write_bytes
from tlpersona.locks import exclusive
from tlpersona.models import LayerSpec, default_device, load_model
from tlpersona.safety import check_analysis_dir, check_count

#: Stored besides the seven recipes: the sink position and the sink-free prompt mean feed the
#: report's attention-sink check.
POSITIONS = ("all6", "first", "prompt_mean_no_first")
#: The short steering section: `add` only, at these strengths (× the layer's typical norm).
STEER_ALPHAS = (0.03125, 0.0625, 0.125, 0.25)


@dataclass(frozen=True)
class ExperimentResult:
    """Everything :func:`tlpersona.experiment` produced; ``report`` is the one markdown file
    that stitches the sections together."""

    store: Store
    compare: CompareResult
    subspace: SubspaceResult
    patch: PatchResult
    steering: SteeringResult
    report: Path
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time


def _cpu(device: str | None) -> bool:
    import torch

    return (device or "").startswith("cpu") or not torch.cuda.is_available()


def experiment(out: str | Path = "tlpersona-out/experiment", *, model: str = "default",
               personas: Sequence[Persona] | None = None,
               questions: Sequence[Question] | None = None, limit_questions: int | None = None,
               prompt_index: PromptIndex = 0, layers: LayerSpec = "default",
               max_new_tokens: int | None = None, batch_size: int | None = None,
               device: str | None = None, dtype: str | None = None, attn: str = "auto",
               permutations: int = 1000, seed: int = 0, splits: int = 10,
               null_draws: int = 100, thresholds: Thresholds | None = None,
               progress: bool = True) -> ExperimentResult:
    """Extract all seven recipes (plus the sink diagnostics' positions) into ``out/store``,
    compare them, find their shared subspace, run a short patching and steering section, and
    write ``out/compare/report.md``.

    On the CPU the defaults keep it to minutes: the first 12 questions (``limit_questions``;
    0 for every question) and 24-token responses (``max_new_tokens``). Patching uses 3 personas
    × 2 questions against the ``assistant`` persona (else the first); steering adds each
    recipe's vector at the middle stored layer for the 3 personas farthest from it.
    """
    out = Path(out)
    check_analysis_dir(out, "`out`")
    check_count(limit_questions, "`limit_questions`", 0)
    for name, value in (("permutations", permutations), ("splits", splits),
                        ("null_draws", null_draws)):
        check_count(value, f"`{name}`", 1)  # before hours of extraction, not after
    ps = builtin_personas() if personas is None else list(personas)
    all_questions = builtin_questions() if questions is None else list(questions)
    cpu = _cpu(device)
    if limit_questions is None and cpu:
        limit_questions = 12
    qs = all_questions[:limit_questions] if limit_questions else all_questions
    if max_new_tokens is None and cpu:
        max_new_tokens = 24
    # the whole run holds `out` and its report directory: another run cannot replace a
    # section between this run's save and the final report
    with exclusive(out, "`out`"), exclusive(out / "compare", "`out`"):
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        store = extract(model, ps, qs, positions=POSITIONS, layers=layers, out=out / "store",
                        prompt_index=prompt_index, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, device=device, dtype=dtype, attn=attn,
                        progress=progress)
        seconds["extract"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cmp = compare(store, permutations=permutations, seed=seed, splits=splits,
                      null_draws=null_draws, thresholds=thresholds)
        report = cmp.save(out / "compare", title=f"Recipe comparison: {model}")
        seconds["compare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sub = subspace(store, seed=seed, null_draws=null_draws)
        sections = [sub.save(report.parent)]
        seconds["subspace"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        base = "assistant" if "assistant" in store.personas else store.personas[0]
        loaded = load_model(model, device or default_device(), dtype, attn)  # patch and steer share it
        pat = patch(loaded, ps, qs, store=store, n_personas=3, n_questions=2, corrupt=base,
                    progress=progress)
        sections.append(pat.save(report.parent))
        seconds["patching"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stored = store.layers
        mid = stored[(len(stored) - 1) // 2]
        # the store's questions are the first ones: steering scores on later ones where there are any
        steering = steer(store, loaded, ps, all_questions, n_questions=5, n_personas=3, base=base,
                         layers=[mid], operators=["add"], alphas=STEER_ALPHAS, response_tokens=6,
                         seed=seed, n_boot=1000, continuations=1, continuation_tokens=16,
                         progress=progress)
        sections.append(steering.save(report.parent))
        seconds["steering"] = time.perf_counter() - t0
        atomic_write_bytes(report, report.read_bytes()
                           + b"".join(b"\n" + s.read_bytes() for s in sections))
    return ExperimentResult(store, cmp, sub, pat, steering, report, seconds)
