"""Markdown section, files and figures of a patching result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlpersona.infra.files import atomic_write_bytes, json_bytes
from tlpersona.report import plots
from tlpersona.report.compare import fixed
from tlpersona.report.section import Section, write_section
from tlpersona.version import __version__


def write_patch(result: Any, out: str | Path) -> Section:
    """Write patch.json, figures (one per method and component) and patch.md into ``out``;
    return them as its :class:`~tlpersona.report.section.Section`. ``result``: a
    :class:`~tlpersona.interventions.patching.PatchResult`."""
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "patch.json",
                       json_bytes({"patching": result.to_dict(), "code_version": __version__}))
    files = [out / "patch.json"]
    cfg = result.config
    layers, rows = result.layers, result.positions
    lines = ["## Activation patching", ""]
    read = ("the last prompt token" if not cfg.response_tokens else
            f"the last prompt token and {cfg.response_tokens} teacher-forced response tokens")
    lines += [
        "### Patching", "",
        f"Clean: a persona's system prompt + question; corrupt: "
        f"{'the next persona' if cfg.corrupt == 'next' else repr(cfg.corrupt)} with the "
        f"same question ({len(result.pairs)} pairs × {len(result.questions)} questions; "
        f"clean personas: {result.personas_note}). One component at one named position and "
        f"layer copied from clean into corrupt; next-token distributions read at {read}. "
        f"Effect 0 = corrupt, 1 = clean (KL / logit difference, ratios of sums over examples). "
        f"Mean KL(clean || corrupt) = {fixed(result.kl_clean_corrupt_mean)}. `sys_start+i` rows are "
        "system-text tokens aligned by index from the start of the system text.", "",
        "**Read beside the rewording control.** The effects say where the difference between the "
        "two system prompts is carried, not by themselves that it is the persona: a rewording of "
        "the corrupt persona's own prompt (no persona change) can give effects of the same size "
        f"at the largest cells. The control repeats the exact grid that way ({result.control_note}), "
        "and the test below says which cells and regions do more for a persona swap than for a "
        "rewording. Patching the residual stream at the read position after the last block copies "
        "the clean output, so that cell is 1 by construction (marked ¹). Each grid cell is a ratio "
        f"of sums over its {len(result.pairs) * len(result.questions)} examples at most (fewer "
        "where a system-text token is missing); no cell is picked out by its size alone, as one "
        "picked and scored on the same examples would overstate it.", ""]
    exact = result.select("exact", cfg.hook)
    if exact:
        lines += [f"Exact patching of `{cfg.hook}` ({fixed(result.seconds.get('exact'), 1)} s):", ""]
        if cfg.hook == "head":
            files.append(plots.head_heatmap(exact, layers, result.n_heads, "exact, head",
                                            figs / "patching.png"))
        else:
            files.append(plots.patching_heatmap(exact, rows, layers, f"exact, {cfg.hook}",
                                                figs / "patching.png"))
            lines += [*_grid_table(exact, rows, layers, result), ""]
        lines += ["![patching](figures/patching.png)", ""]
        if result.control and cfg.hook != "head":
            lines += [f"Rewording control, exact `{cfg.hook}` ({result.control_note}; KL / "
                      "logit-difference effect):", "",
                      *_grid_table(result.control, rows, layers, result), ""]
    lines += _test_section(result, rows, layers)
    comps = [c for c in cfg.attribution_hooks if result.select("attribution", c)]
    if comps:
        lines += [
            f"Attribution patching ({fixed(result.seconds.get('attribution'), 1)} s): the "
            "first-order estimate grad × (clean − corrupt activation), every cell of every "
            "component from one clean forward and one corrupt forward + backward per example.", ""]
        for a in result.agreement:
            regions = "; ".join(f"{name} {fixed(r, 2)} ({n} cells)" for name, (r, n) in a.by_region.items())
            gaps = "; ".join(f"{_cell_name_t(g)} exact {fixed(g[3], 2)} vs {fixed(g[4], 2)}"
                             for g in a.largest_gaps[:3])
            lines += [f"- Agreement with exact `{a.component}` ({a.metric.upper()} effect): "
                      f"Spearman {fixed(a.spearman, 2)} over {a.n_cells} cells that are not no-ops; "
                      f"{regions}. Largest gaps: {gaps}."]
        if result.agreement:
            lines += ["", "The linear estimate holds where a patch is a small change of the "
                      "activation; at system-text tokens it swaps one token's identity for "
                      "another, far outside that range, so read attribution there as a "
                      "screening signal and check with exact patching.", ""]
        for comp in comps:
            cells = result.select("attribution", comp)
            fig = f"attribution_{comp}.png"
            if comp == "head":
                files.append(plots.head_heatmap(cells, layers, result.n_heads, "attribution, head",
                                                figs / fig))
            else:
                files.append(plots.patching_heatmap(cells, rows, layers, f"attribution, {comp}",
                                                    figs / fig))
            lines += [f"`{comp}`: ![{comp}](figures/{fig})", ""]
    return write_section(out / "patch.md", "\n".join(lines), files)


def _test_section(result: Any, rows: list[str], layers: list[int]) -> list[str]:
    """The persona-beyond-rewording test: pairing, families, the regions, the cells called and a
    grid of Holm-adjusted p."""
    t = result.rewording_test
    lines = ["### Persona beyond the rewording control", ""]
    if t is None:
        return lines + [f"No test: the rewording control was {result.control_note}. "
                        f"{result.answer()}", ""]
    lines += [
        f"**{result.answer()}**", "",
        f"Test: {t.pairing}. Null: the cell does no more for a persona swap than for a rewording "
        "(each question's difference symmetric about 0); claim: persona effect > control effect "
        f"(KL effect; the logit difference is undefined where a rewording keeps the top token). "
        f"One family, Holm-adjusted at {t.alpha:g}: the {t.n_cells} cells "
        "defined in both grids (cells that are 1 by construction, and no-ops in either grid, "
        "which compare a patch with no patch, left out) "
        f"and the {len(t.regions)} regions (system-text tokens / positions after the system "
        "text), whose per-question difference is the mean over the region's cells (a region and "
        f"its cells are claimed together, so corrected together). With {t.n} questions the "
        f"smallest p is {fixed(t.min_p, 4)}, so the smallest reachable Holm p is "
        f"{fixed(t.min_holm_cells, 4)} ({t.questions_for_cells} questions reach "
        f"{t.alpha:g}). Effects here are means over questions of per-question ratios of sums, "
        "so they differ slightly from the grid's. What it shows: for these persona pairs and "
        "rewordings, patching the cell restores a larger share of the persona swap's KL than of "
        "a rewording's; the claim does not extend to other personas or wordings.", "",
        "| region | cells | persona | control | difference | p | Holm p | beyond rewording |",
        "|---|---|---|---|---|---|---|---|"]
    for r in t.regions:
        k = sum(1 for c in t.cells if _region(c.position) == r.position)
        lines.append(f"| {r.position} | {k} | {fixed(r.persona, 3)} | {fixed(r.control, 3)} | "
                     f"{r.difference:+.3f} | {fixed(r.p, 4)} | {fixed(r.p_holm, 4)} | "
                     f"{'yes' if r.carries else 'no'} |")
    called = [c for c in t.cells if c.carries]
    lines += ["", f"Cells beyond the rewording control (Holm p ≤ {t.alpha:g}): " + (
        "; ".join(f"{_cell(c)} {c.persona:.2f} vs {c.control:.2f} (Holm p {fixed(c.p_holm, 3)})"
                  for c in called) if called else "none") + ".", ""]
    if result.config.hook != "head":
        by = {(c.position, c.layer): c for c in t.cells}
        lines += [f"Difference (persona − control KL effect) / Holm p per cell, exact "
                  f"`{result.config.hook}` (blank: not tested):", "",
                  "| position | " + " | ".join(f"L{x}" for x in layers) + " |",
                  "|---|" + "---|" * len(layers)]
        for pos in rows:
            got = [by.get((pos, la)) for la in layers]
            lines.append(f"| {pos} | " + " | ".join(
                "" if c is None else f"{c.difference:+.2f} / {fixed(c.p_holm, 2)}" for c in got) + " |")
        lines.append("")
    return lines


def _region(position: str) -> str:
    from tlpersona.interventions.patching import region

    return region(position)


def _cell(c: Any) -> str:
    from tlpersona.interventions.patching import cell_name

    return cell_name(c)


def _grid_table(cells: list[Any], rows: list[str], layers: list[int], result: Any) -> list[str]:
    """Markdown table of positions × layers: each cell's KL / logit-difference effect (``¹``: 1
    by construction), blank where the cell is not defined."""
    by = {(c.position, c.layer): c for c in cells if c.head is None}
    out = ["| position | " + " | ".join(f"L{x}" for x in layers) + " |",
           "|---|" + "---|" * len(layers)]
    for pos in rows:
        got = [by.get((pos, la)) for la in layers]
        out.append(f"| {pos} | " + " | ".join(
            "" if c is None else f"{fixed(c.kl_effect, 2)} / {fixed(c.ld_effect, 2)}"
            + ("¹" if _by_construction(c, result) else "") for c in got) + " |")
    return out


def _by_construction(c: Any, result: Any) -> bool:
    """A residual-stream patch after the last block at the read position: 1 whatever the personas
    (see :func:`tlpersona.interventions.patching.by_construction`)."""
    from tlpersona.interventions.patching import by_construction

    return by_construction(c, result.n_layers, result.config.response_tokens)


def _cell_name_t(key: tuple) -> str:
    position, layer, head = key[:3]
    return f"{position} L{layer}" + ("" if head is None else f" H{head}")
