"""The flagship run: extract every recipe, compare, find the shared subspace, patch, steer, and
write one report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlpersona.analyses.compare.result import CompareResult, Thresholds
from tlpersona.analyses.subspace_result import SubspaceResult
from tlpersona.api.analysis import compare, subspace
from tlpersona.api.causal import patch, steer
from tlpersona.api.extraction import PromptIndex, extract
from tlpersona.api.trajectory import TrajectoryResult, builtin_trajectory
from tlpersona.cache.reader import Store
from tlpersona.data import Persona, Question, builtin_personas, builtin_questions
from tlpersona.infra.checks import check_count
from tlpersona.infra.locks import exclusive
from tlpersona.infra.paths import check_analysis_dir, check_results_dir
from tlpersona.infra.resultsets import results_set
from tlpersona.interventions.patching import PatchResult
from tlpersona.interventions.steering import SteeringResult
from tlpersona.models.layers import LayerSpec
from tlpersona.models.loading import default_device, load_model
from tlpersona.report.experiment import HEADLINE_CHARS, Answer, write_experiment_report
from tlpersona.report.html import write_html
from tlpersona.report.section import Section

#: Stored besides the seven recipes: the sink position and the sink-free prompt mean feed the
#: report's attention-sink check.
POSITIONS = ("all6", "first", "prompt_mean_no_first")
#: The short patching section's rows: the system text (every token of it), its end, the last token.
PATCH_POSITIONS = ("system", "sys_end", "last")
#: The short steering section: `add` only, at these strengths (× the layer's typical norm).
STEER_ALPHAS = (0.015625, 0.03125, 0.0625, 0.125, 0.25)  # 5: an exact Spearman p can reach 0.017


@dataclass(frozen=True)
class ExperimentResult:
    """Everything :func:`tlpersona.experiment` produced; ``report`` is the one markdown file
    that stitches the sections together."""

    store: Store
    compare: CompareResult
    subspace: SubspaceResult
    patch: PatchResult
    steering: SteeringResult
    trajectory: TrajectoryResult
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
               permutations: int | None = None, seed: int = 0, splits: int = 10,
               null_draws: int = 100, thresholds: Thresholds | None = None,
               progress: bool = True, overwrite: bool = False) -> ExperimentResult:
    """Extract all seven recipes (plus the sink diagnostics' positions) into ``out/store``,
    compare them, find their shared subspace, run short patching, steering and drift sections, and
    write ``out/compare/report.md``.

    On the CPU the defaults keep it to minutes: the first 12 questions (``limit_questions``;
    0 for every question) and 24-token responses (``max_new_tokens``). Patching uses 3 personas
    × 10 questions at two early-to-middle layers against the ``assistant`` persona (else the
    first), enough for the rewording test of cells and regions to reach Holm 0.05; steering adds each
    recipe's vector at the middle stored layer for the 3 personas farthest from it.
    ``out/compare/report.md`` answers the five questions on its first screen;
    ``details.md`` and ``cells.csv`` beside it hold every table and cell.

    ``out/compare`` is written as one set when every section is done (a failure or a kill
    leaves an earlier run's set whole); an earlier run's set is replaced only with
    ``overwrite``. ``out/store`` resumes or is refused as :func:`tlpersona.extract` decides.
    """
    from tlpersona.report.patch import write_patch
    from tlpersona.report.steering import write_steering
    from tlpersona.report.subspace import write_subspace
    from tlpersona.report.trajectory import write_trajectory

    out = Path(out)
    check_analysis_dir(out, "`out`")
    check_results_dir(out / "compare", overwrite)  # before hours of extraction
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
    # the whole run holds `out` and its report directory: another run cannot write there
    # between this run's check and its results set
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
        seconds["compare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sub = subspace(store, seed=seed, null_draws=null_draws)
        seconds["subspace"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        base = "assistant" if "assistant" in store.personas else store.personas[0]
        loaded = load_model(model, device or default_device(), dtype, attn)  # patch and steer share it
        # 10 questions: the rewording test's one family (~14 cells and 2 regions) can reach
        # Holm 0.05 (16 × 2^-10); two early-to-middle layers, where system text is read
        n_blocks = loaded.info.n_layers
        pat = patch(loaded, ps, qs, store=store, n_personas=3, n_questions=10, corrupt=base,
                    layers=sorted({round(0.14 * n_blocks), round(0.4 * n_blocks)}),
                    positions=PATCH_POSITIONS, progress=progress)
        seconds["patching"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stored = store.layers
        mid = stored[(len(stored) - 1) // 2]
        # the store's questions are the first ones: steering scores on later ones where there are any
        steering = steer(store, loaded, ps, all_questions, n_questions=5, n_personas=3, base=base,
                         layers=[mid], operators=["add"], alphas=STEER_ALPHAS, response_tokens=6,
                         seed=seed, n_boot=1000, continuations=1, continuation_tokens=16,
                         progress=progress)
        seconds["steering"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        traj = builtin_trajectory(store, loaded)
        seconds["trajectory"] = time.perf_counter() - t0
        # report.html: the same report as one offline page, drawn once every section is in
        with results_set(out / "compare", "experiment", overwrite, finish=write_html) as stage:
            cmp.save(stage, title=f"Recipe comparison: {model}")
            # each renderer hands back the markdown it wrote: the report is stitched from those
            sections = [write_subspace(sub, stage), write_patch(pat, stage),
                        write_steering(steering, stage), write_trajectory(traj, stage)]
            _write_report(stage, f"Persona experiment: {model}", cmp, sub, pat, steering, traj,
                          sections, seconds)
        report = out / "compare" / "report.md"
    return ExperimentResult(store, cmp, sub, pat, steering, traj, report, seconds)


def headline(cmp: CompareResult, sub: SubspaceResult, pat: PatchResult,
             steering: SteeringResult, alpha: float) -> str:
    """The four answers in one line (at most HEADLINE_CHARS characters); ``alpha``: the
    comparison's family-wise level."""
    beyond = sum(c.mc_r_p_holm is not None and c.mc_r_p_holm < alpha for c in cmp.cells)
    agree = "recipe-robust" if cmp.recipe_robust else "not recipe-robust"
    # the test calls a layer (k ≥ 1 beyond the null); the count k is descriptive beyond that
    found = [f"L{la.layer} (k_found {la.k_found.k})" for la in sub.layers if la.k_found.beyond_null]
    shared = ("shared subspace beyond chance at " + ", ".join(found[:3])
              + (" …" if len(found) > 3 else "") if found else "no shared subspace beyond chance")
    ops = {s.operator for s in steering.scores}
    op = "add" if "add" in ops else sorted(ops)[0] if ops else ""
    steers = [s.recipe for s in steering.scores_for(op) if s.beats_random] if op else []
    verb = "steers" if len(steers) == 1 else "steer"
    parametric = any(s.random_test == "t" for s in steering.scores if s.beats_random)
    steer = (f"{', '.join(steers[:3])}{' …' if len(steers) > 3 else ''} {verb} beyond random"
             + (" (parametric)" if parametric else "") if steers else "no recipe steers beyond random")
    test = pat.rewording_test
    regions = [r.position for r in test.regions if r.carries] if test else []
    cells = sum(c.carries for c in test.cells) if test else 0
    patch = (f"patching beyond a rewording: {', '.join(regions) or 'no region'}, {cells} cell(s)"
             if regions or cells else "no patched cell beyond the rewording control")
    text = (f"Recipes {agree} ({beyond}/{len(cmp.cells)} cells' geometry beyond chance); "
            f"{shared}; {steer}; {patch}.")
    return text if len(text) <= HEADLINE_CHARS else text[: HEADLINE_CHARS - 1] + "…"


def _write_report(out: Path, title: str, cmp: CompareResult, sub: SubspaceResult,
                  pat: PatchResult, steering: SteeringResult, traj: TrajectoryResult,
                  sections: list[Section], seconds: dict[str, float]) -> Section:
    from tlpersona.report.compare import details, run_line

    mid = cmp.layers[len(cmp.layers) // 2]
    sub_mid = sub.layers[len(sub.layers) // 2].layer if sub.layers else mid
    answers = [
        Answer("Do the recipes recover the same persona axis?",
               cmp.answer.removeprefix("Do the recipes agree? "), "details.md"),
        Answer("Is there a shared persona subspace?", sub.answer, "subspace.md"),
        Answer("Which recipe's vector steers toward the persona?", steering.answer(),
               "steering.md"),
        Answer("Where does patching carry the persona beyond a rewording?", pat.answer(),
               "patch.md"),
        Answer("Does a conversation drift out of its persona?", traj.answer(), "trajectory.md"),
    ]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    figures = [("verdicts", "figures/verdicts.png"), ("matrix r", f"figures/matrix_r_L{mid}.png"),
               ("subspace agreement", f"figures/subspace_agreement_L{sub_mid}.png"),
               ("steering effects", "figures/steering_effects.png"),
               ("patching", "figures/patching.png"),
               ("drift along the axis", "figures/trajectories.png")]
    return write_experiment_report(
        out, title, headline(cmp, sub, pat, steering, cmp.alpha), answers,
        run_line(cmp) + f" Wall time: {timing}.", figures,
        # the comparison's tables again, under the experiment's title (details.md only)
        [Section("\n".join(details(cmp, title)), ()), *sections])
