"""Markdown section, files and figures of a patching result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlpersona.files import atomic_write_bytes, json_bytes
from tlpersona.report import plots
from tlpersona.report.compare import _f


def write_patch(result: Any, out: str | Path) -> str:
    """Write patch.json and figures (one per method and component) into ``out``; return a
    markdown section. ``result``: a :class:`~tlpersona.interventions.patching.PatchResult`."""
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "patch.json", json_bytes({"patching": result.to_dict()}))
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
        f"Mean KL(clean || corrupt) = {_f(result.kl_clean_corrupt_mean)}. `sys_start+i` rows are "
        "system-text tokens aligned by index from the start of the system text.", "",
        "**Descriptive; read beside the rewording control.** The effects say where the "
        "difference between the two system prompts is carried, not by themselves that it is the "
        "persona: an independent check found a rewording of the corrupt persona's own prompt "
        "(no persona change) giving effects of the same size at the largest cells. The control "
        f"below repeats the exact grid that way ({result.control_note}); a cell that does no "
        "more here than there shows no persona information. No test separates the two yet. "
        "Patching the residual stream at the read position after the last block copies the "
        "clean output, so that cell is 1 by construction (marked ¹). Each cell is a ratio of "
        f"sums over its {len(result.pairs) * len(result.questions)} examples at most (fewer "
        "where a system-text token is missing); no cell is picked out as the most important, "
        "as one picked and scored on the same examples would overstate it.", ""]
    exact = result.select("exact", cfg.hook)
    if exact:
        lines += [f"Exact patching of `{cfg.hook}` ({_f(result.seconds.get('exact'), 1)} s):", ""]
        if cfg.hook == "head":
            plots.head_heatmap(exact, layers, result.n_heads, "exact, head", figs / "patching.png")
        else:
            plots.patching_heatmap(exact, rows, layers, f"exact, {cfg.hook}", figs / "patching.png")
            lines += [*_grid_table(exact, rows, layers, result), ""]
        lines += ["![patching](figures/patching.png)", ""]
        if result.control and cfg.hook != "head":
            lines += [f"Rewording control, exact `{cfg.hook}` ({result.control_note}; KL / "
                      "logit-difference effect):", "",
                      *_grid_table(result.control, rows, layers, result), ""]
    comps = [c for c in cfg.attribution_hooks if result.select("attribution", c)]
    if comps:
        lines += [
            f"Attribution patching ({_f(result.seconds.get('attribution'), 1)} s): the "
            "first-order estimate grad × (clean − corrupt activation), every cell of every "
            "component from one clean forward and one corrupt forward + backward per example.", ""]
        for a in result.agreement:
            regions = "; ".join(f"{name} {_f(r, 2)} ({n} cells)" for name, (r, n) in a.by_region.items())
            gaps = "; ".join(f"{_cell_name_t(g)} exact {_f(g[3], 2)} vs {_f(g[4], 2)}"
                             for g in a.largest_gaps[:3])
            lines += [f"- Agreement with exact `{a.component}` ({a.metric.upper()} effect): "
                      f"Spearman {_f(a.spearman, 2)} over {a.n_cells} cells that are not no-ops; "
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
                plots.head_heatmap(cells, layers, result.n_heads, "attribution, head", figs / fig)
            else:
                plots.patching_heatmap(cells, rows, layers, f"attribution, {comp}", figs / fig)
            lines += [f"`{comp}`: ![{comp}](figures/{fig})", ""]
    section = "\n".join(lines)
    atomic_write_bytes(out / "patch.md", section.encode())
    return section


def _grid_table(cells: list[Any], rows: list[str], layers: list[int], result: Any) -> list[str]:
    """Markdown table of positions × layers: each cell's KL / logit-difference effect (``¹``: 1
    by construction), blank where the cell is not defined."""
    by = {(c.position, c.layer): c for c in cells if c.head is None}
    out = ["| position | " + " | ".join(f"L{x}" for x in layers) + " |",
           "|---|" + "---|" * len(layers)]
    for pos in rows:
        got = [by.get((pos, la)) for la in layers]
        out.append(f"| {pos} | " + " | ".join(
            "" if c is None else f"{_f(c.kl_effect, 2)} / {_f(c.ld_effect, 2)}"
            + ("¹" if _by_construction(c, result) else "") for c in got) + " |")
    return out


def _by_construction(c: Any, result: Any) -> bool:
    """A residual-stream patch after the last block at the read position (``last``, when only
    it is read): the patched run's output is the clean run's, effect 1 whatever the personas."""
    cfg = result.config
    return (c.component == "resid_post" and c.position == "last" and not cfg.response_tokens
            and c.layer == result.n_layers - 1)


def _cell_name_t(key: tuple) -> str:
    position, layer, head = key[:3]
    return f"{position} L{layer}" + ("" if head is None else f" H{head}")
