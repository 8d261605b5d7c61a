"""Markdown report and results files for a comparison."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tlpersona.analyses.ceilings import CkaCell
from tlpersona.analyses.compare.result import CompareResult, PairCell, RecipeSinkLength
from tlpersona.analyses.controls import FloorStats
from tlpersona.analyses.metrics import HeldOutCos
from tlpersona.infra.files import atomic_write_bytes, json_bytes
from tlpersona.report import plots
from tlpersona.report.section import Section, write_section


def fixed(v: float | None, nd: int = 3) -> str:
    """``v`` with ``nd`` decimals; "n/a" for None (a statistic that is undefined or was not run)."""
    return "n/a" if v is None else f"{v:.{nd}f}"


def marked(cell: PairCell) -> str:
    """A cell's verdict with its noise mark: ``KILL (noise)``, ``GREY (inconclusive)``,
    ``KILL (beyond noise)``; a PASS has none."""
    mark = cell.noise_mark
    return cell.verdict + (f" ({mark})" if mark else "")


def verdict_table(result: CompareResult | Mapping[str, Any]) -> str:
    """The verdict of every pair at every layer, one row per pair. ``result``: a
    :class:`CompareResult`, or results.json as a mapping."""
    if not isinstance(result, CompareResult):
        result = CompareResult.of(dict(result), None)
    layers = result.layers
    rows = ["| pair | tag | " + " | ".join(f"L{x}" for x in layers) + " |",
            "|---|---|" + "---|" * len(layers)]
    seen: dict[tuple[str, str], dict[int, str]] = {}
    tags = {}
    for c in result.cells:
        seen.setdefault(c.pair, {})[c.layer] = marked(c)
        tags[c.pair] = c.tag
    for key, by_layer in seen.items():
        rows.append(f"| {key[0]} ~ {key[1]} | {tags[key]} | "
                    + " | ".join(by_layer.get(x, "") for x in layers) + " |")
    return "\n".join(rows)


def _p(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}" if v >= 1e-4 else f"{v:.1e}"


def _detail_table(result: CompareResult, layer: int) -> str:
    rows = ["| pair | cos mean (null; ceiling) | cos min (null p95; ceiling) | cos p5 (null p95) "
            "| mc cos mean (null) | raw r (null p95) | mc r (null p95) | mc r ceiling | mc Spearman "
            "| Mantel p (Holm) | spread ρ | CKA lin / debiased (null p95; ceiling), for comparability "
            "| verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result.cells:
        if c.layer != layer:
            continue
        s, mc, raw, mr = c.per_persona_cos, c.per_persona_cos_mc, c.matrix_raw, c.matrix_mc
        rows.append(
            f"| {c.x} ~ {c.y} | {fixed(s.mean)} ({fixed(s.null_mean)}; "
            f"{fixed(c.ceiling.per_persona_cos_mean)}) "
            f"| {fixed(s.min)} ({fixed(s.null_min_p95)}; {fixed(c.ceiling.per_persona_cos_min)}) "
            f"| {fixed(s.p5)} ({fixed(s.null_p5_p95)}) "
            f"| {fixed(mc.mean)} ({fixed(mc.null_mean)}) "
            f"| {fixed(raw.pearson)} ({fixed(raw.null_p95)}) | {fixed(mr.pearson)} ({fixed(mr.null_p95)}) "
            f"| {fixed(c.ceiling.matrix_mc_pearson)} | {fixed(mr.spearman)} "
            f"| {_p(mr.mantel_p)} ({_p(mr.mantel_p_holm)}) | {fixed(c.spread.spearman)} "
            f"| {_cka_text(c.cka)} "
            f"| **{c.verdict}**{marked(c)[len(c.verdict):]} |")
    return "\n".join(rows)


def _cka_text(cka: CkaCell | None) -> str:
    """``0.912 (0.310; 0.880) / 0.850 (0.020; 0.830)``: linear then debiased CKA, each with its
    null's 95th percentile and its ceiling; results from before CKA was added have none."""
    if cka is None:
        return "n/a"
    return " / ".join(f"{fixed(s.value)} ({fixed(s.null_p95)}; {fixed(s.ceiling)})"
                      for s in (cka.linear, cka.debiased))


def _procrustes_table(result: CompareResult, layer: int) -> str:
    rows = ["| pair | held-out Procrustes cos | null mean / p95 | ceiling | z | p (Holm where reachable) |",
            "|---|---|---|---|---|---|"]
    for c in result.cells:
        if c.layer != layer:
            continue
        pc = c.procrustes
        if not isinstance(pc, HeldOutCos):
            rows.append(f"| {c.x} ~ {c.y} | {pc.reason} | | | | |")
            continue
        holm_p = f" ({_p(pc.p_holm)})" if pc.p_holm is not None else ""
        rows.append(f"| {c.x} ~ {c.y} | {fixed(pc.mean)} "
                    f"| {fixed(pc.null_mean)} / {fixed(pc.null_p95)} | {fixed(pc.ceiling)} "
                    f"| {fixed(pc.z, 1)} | {_p(pc.p)}{holm_p} |")
    return "\n".join(rows)


def _floor_table(result: CompareResult) -> str:
    rows = ["| recipe | layer | per-persona cos: mean / min | mc matrix r: mean / min (half-size) "
            "| mc matrix r, full size (Spearman–Brown) |", "|---|---|---|---|---|"]
    for pos, by_layer in result.noise_floor.items():
        for layer, v in by_layer.items():
            if isinstance(v, FloorStats):
                rows.append(f"| {pos} | {layer} | {fixed(v.per_persona_cos_mean, 4)} / "
                            f"{fixed(v.per_persona_cos_min, 4)} | {fixed(v.matrix_mc_pearson_mean, 4)}"
                            f" / {fixed(v.matrix_mc_pearson_min, 4)} | "
                            f"{fixed(v.matrix_mc_pearson_full, 4)} |")
            else:
                rows.append(f"| {pos} | {layer} | {v.reason} | — | — |")
    return "\n".join(rows)


def sink_warnings(result: CompareResult) -> list[str]:
    """``position (Llayer)`` for every recipe and layer whose persona variance lies mostly
    along the attention sink."""
    return [f"{p} (L{layer})" for layer, row in (result.sink.layers or {}).items()
            for p in result.positions if row.recipes[p].warning]


def _sink_section(result: CompareResult) -> list[str]:
    sink = result.sink
    if not sink.available or sink.layers is None:
        return [f"Not measured: {sink.reason or 'no first-token position'}."]
    positions = result.positions
    rows = ["| layer | first-token norm | " + " | ".join(positions) + " |",
            "|---|---|" + "---|" * len(positions)]
    warned = sink_warnings(result)
    for layer, row in sink.layers.items():
        cells = []
        for p in positions:
            e = row.recipes[p]
            txt = fixed(e.share, 2)
            if isinstance(e, RecipeSinkLength) and e.r_with_inverse_length is not None:
                txt += f" (r {e.r_with_inverse_length:+.2f})"
            cells.append(f"**{txt}**" if e.warning else txt)
        rows.append(f"| {layer} | {row.sink_norm:.0f} | " + " | ".join(cells) + " |")
    lines = ["Share of each recipe's between-persona variance along the first token's residual "
             "direction (the attention sink; in brackets, where prompt lengths are stored, the "
             "correlation of that coordinate with 1/prompt length).", "", *rows, ""]
    if warned:
        lines += [f"**Warning:** more than {sink.warn_above:.0%} of the persona variance of "
                  f"{', '.join(warned)} lies along the sink direction: there the recipe mostly "
                  "measures how much weight the sink token gets in a mean (prompt length), not the "
                  "persona. `prompt_mean_no_first` leaves the first token out.", ""]
    return lines


def _bstar_section(result: CompareResult) -> str:
    b = result.bstar
    if not b.available or b.layers is None:
        return f"Not available: {b.reason}."
    rows = ["| layer | cos(A, B*) mean / min | cos(A, B*_no_last) mean / min | identity max rel. error |",
            "|---|---|---|---|"]
    for layer, r in b.layers.items():
        ident = r.identity_max_rel_error
        ok = "" if ident is None else (" (holds)" if r.identity_holds else " (FAILS)")
        rows.append(f"| {layer} | {fixed(r.cos_a_bstar.mean)} / {fixed(r.cos_a_bstar.min)} | "
                    f"{fixed(r.cos_a_bstar_no_last.mean)} / {fixed(r.cos_a_bstar_no_last.min)} | "
                    f"{'n/a' if ident is None else f'{ident:.2e}'}{ok} |")
    note = b.identity_note
    return "\n".join(rows) + (f"\n\n{note}." if note else "")


def first_screen(result: CompareResult, title: str) -> list[str]:
    """The answer first: one sentence with its numbers, what limits it, the run in one line,
    the figures; every table is in details.md, every cell's numbers in cells.csv."""
    layers = result.layers
    mid = layers[len(layers) // 2]
    warned = sink_warnings(result)
    notes = list(result.notes)
    if warned:
        notes.append(f"Attention sink: most of the persona variance of {', '.join(warned)} lies "
                     "along the first token's direction (prompt length, not persona; details).")
    return [
        f"# {title}", "",
        f"**{result.answer}**", "",
        *[f"- {n}" for n in notes], *([""] if notes else []),
        run_line(result), "",
        "![verdicts](figures/verdicts.png)", "",
        f"![matrix r](figures/matrix_r_L{mid}.png)", "",
        "Every table: [details.md](details.md); every cell's numbers: [cells.csv](cells.csv) "
        "(one row per layer × pair); everything: results.json.", "",
    ]


def run_line(result: CompareResult) -> str:
    """Who was compared and how hard the tests could look, in one line."""
    auto = " (sized to the family)" if result.permutations_auto else ""
    return (f"{result.n_personas} personas, {result.n_questions} questions, "
            f"{len(result.positions)} recipes, layers {', '.join(map(str, result.layers))}: "
            f"{len(result.cells)} cells; {result.n_permutations} Mantel permutations{auto}, "
            f"smallest reachable Holm p {_p(result.min_attainable_p_holm)}; paired tests: "
            f"{result.paired_test}; seed {result.seed}; input manifest "
            f"{result.inputs.manifest_hash[:12]}.")


def write_report(result: CompareResult, out: str | Path,
                 title: str = "Recipe comparison") -> Section:
    """Write results.json, figures/*.png, details.md (every table) and report.md (the answer)
    into ``out``; returns them as report.md's :class:`~tlpersona.report.section.Section`."""
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", json_bytes(result.to_dict()))
    layers = result.layers
    mid = layers[len(layers) // 2]
    files = [out / "results.json",
             plots.verdict_heatmap(result, figs / "verdicts.png"),
             plots.cosine_violins(result, mid, figs / f"cosines_L{mid}.png"),
             plots.matrix_bars(result, mid, figs / f"matrix_r_L{mid}.png"),
             plots.cosine_matrices(result.cos_matrices[mid], result.personas, mid,
                                   figs / f"cos_matrices_L{mid}.png")]
    atomic_write_bytes(out / "details.md", "\n".join(details(result, title)).encode())
    files.append(out / "details.md")
    return write_section(out / "report.md", "\n".join(first_screen(result, title)), files)


def details(result: CompareResult, title: str) -> list[str]:
    """details.md: definitions, the verdict table, every layer's statistics, the ceilings,
    the sink and B* checks and the paired tests."""
    layers = result.layers
    mid = layers[len(layers) // 2]
    th = result.thresholds
    alpha = result.alpha
    sig = sorted((t for t in result.paired_tests if t.p_holm < alpha), key=lambda t: t.p)[:10]
    proc_note = ("Holm-adjusted over all cells" if result.procrustes_corrected else
                 "uncorrected and descriptive (the draws cannot reach alpha after Holm over the "
                 "cells; raise `null_draws` for a corrected claim)")
    lines = [
        f"# {title}: details", "",
        f"**{result.sentence}**", "",
        *[f"- {n}" for n in result.notes], "",
        run_line(result), "",
        f"Verdicts: PASS if per-persona min cos > {th.pass_min_cos} and mean-centred matrix "
        f"r > {th.pass_mc_r} beyond its Mantel null (uncorrected p < {alpha:g}; the Mantel "
        f"test is exact, so unrelated recipes pass a given cell at most {alpha:g} of the time, "
        "whatever their geometry; over many cells some unrelated pairs can pass)"
        + (f" and spread Spearman > {th.pass_spread} where defined" if th.gate_spread
           else " (the spread correlation is descriptive and does not gate the verdict)")
        + f"; KILL if min cos < {th.kill_min_cos} or mean-centred r < {th.kill_mc_r}; GREY "
        "otherwise. Every cell that does not pass carries a mark. For each statistic whose bound "
        "the verdict rests on (the KILL bounds of a KILL, the PASS bounds of a GREY), the "
        "observed value is tested against its ceiling (what identical recipes reach) with its "
        "sampling error: the delete-half jackknife over questions (the spread of the statistic "
        "recomputed on each question half, both recipes on the same half), "
        f"one-sided at {alpha:g} split over the statistics tested. '(beyond noise)': some "
        "statistic is below its ceiling by more than that, so the recipes differ (identical "
        f"recipes get this mark in at most about {alpha:g} of cells; the ceilings run low under "
        "heavy noise, which makes it rarer still). '(noise)': each is within sampling error of "
        "its ceiling, so identical recipes sampled as noisily could give the cell. "
        "'(inconclusive)': a missed condition has no ceiling (the Mantel gate, the spread) or a "
        "recipe has no per-question vectors: the cell shows neither agreement nor a difference. "
        "Groups of agreeing recipes are sets whose every pair passes. cells.csv names the bounds "
        "each cell missed (`failed`).", "",
        "Every statistic is shown with what unrelated personas would give (null) and, where it has "
        "one, what identical data would give (ceiling). Nulls: for mean cosines, the mean over "
        "every persona pairing under a uniform relabelling (exact); for matrix r, the permutation "
        "distribution of persona labels (Mantel, Holm-adjusted over all cells; the permutation "
        "count is sized so that Holm can reach alpha); for the held-out Procrustes cosine, the "
        f"same procedure rerun after relabelling one recipe's personas ({result.n_null} "
        f"draws; its p is {proc_note}). z (distance above the null mean in null standard "
        "deviations) is descriptive.", "",
        "## Verdicts", "", verdict_table(result), "", "![verdicts](figures/verdicts.png)", "",
    ]
    for pos, by_persona in result.missing_rows.items():
        listed = ", ".join(f"{k} ({v})" for k, v in by_persona.items())
        lines += [f"Missing rows for {pos} (left out of its centroids): {listed}.", ""]
    for layer in layers:
        lines += [f"## Layer {layer}", "", _detail_table(result, layer), "",
                  "Held-out Procrustes: centred and reduced to each recipe's top principal "
                  "directions on one half of the personas, rotated onto the other recipe there, "
                  "scored on the other half (both ways round, averaged over "
                  f"{result.procrustes_splits} halvings). Ceiling: the same procedure between two "
                  "question halves of each recipe, Spearman–Brown corrected to full-size centroids "
                  "(geometric mean of the two; 1 for question-invariant recipes).", "",
                  _procrustes_table(result, layer), "",
                  "CKA (for comparability with other tools; not part of the verdict): linear "
                  "CKA and debiased CKA (unbiased HSIC) of the two recipes' centroids, "
                  "mean-centred over personas. Null: the Mantel test's persona permutations; "
                  "its p is in results.json. Ceiling: the geometric mean of each recipe's "
                  "split-half agreement, for linear CKA at half size (no valid full-size "
                  "correction exists; identical recipes reach more at full size), for debiased "
                  "CKA at full size (unbiased HSIC between question halves over each recipe's own "
                  "unbiased HSIC); 1 for question-invariant recipes.", ""]
    lines += [
        f"![cosines](figures/cosines_L{mid}.png)", "", f"![matrix r](figures/matrix_r_L{mid}.png)", "",
        f"![cosine matrices](figures/cos_matrices_L{mid}.png)", "",
        "## Split-half noise floor (ceilings)", "",
        f"Centroids from two random halves of the questions ({result.n_splits} seeded splits), "
        "compared with the same statistics as the recipe pairs. Each half averages half of the "
        "questions, so these are floors for half-size centroids; the last column is the "
        "Spearman–Brown value for full-size centroids. Every ceiling in the tables above is such "
        "a full-size value (2c/(1+c) of the half-size c; for the cosines this is what signal "
        "plus independent per-question noise gives in expectation), because the statistics are "
        "computed on full-size centroids. Min is the minimum over every split.", "",
        _floor_table(result), "",
        "## Attention-sink check", "", *_sink_section(result),
        "## B*_no_last algebra check", "",
        "B* (prompt_mean) includes A's token (last) in its mean, so part of cos(A, B*) is "
        "arithmetic; B*_no_last removes it.", "", _bstar_section(result), "",
        "## Paired tests", "",
        f"{len(result.paired_tests)} tests of whether one pair is more aligned than another "
        f"pair sharing a recipe (sign flips of the per-persona cosine differences; "
        f"{result.paired_test}; no random draws), Holm over all of them: "
        f"{sum(t.p_holm < alpha for t in result.paired_tests)} below {alpha:g}. "
        "The strongest:", "",
        "| layer | pair 1 | pair 2 | mean cos difference | p | z | Holm p |",
        "|---|---|---|---|---|---|---|",
        *[f"| {t.layer} | {' ~ '.join(t.pair_1)} | {' ~ '.join(t.pair_2)} | "
          f"{t.mean_diff:+.4f} | {_p(t.p)} | {t.z:+.1f} | {_p(t.p_holm)} |"
          for t in sig],
        "",
    ]
    return lines
