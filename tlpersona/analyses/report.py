"""Markdown report and results files for a comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tlpersona.analyses import plots
from tlpersona.files import atomic_write_bytes


def _f(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def verdict_table(result: dict[str, Any]) -> str:
    layers = result["layers"]
    rows = ["| pair | tag | " + " | ".join(f"L{x}" for x in layers) + " |",
            "|---|---|" + "---|" * len(layers)]
    seen: dict[tuple[str, str], dict[int, str]] = {}
    tags = {}
    for c in result["cells"]:
        key = (c["pair"][0], c["pair"][1])
        seen.setdefault(key, {})[c["layer"]] = c["verdict"]
        tags[key] = c["tag"]
    for key, by_layer in seen.items():
        rows.append(f"| {key[0]} ~ {key[1]} | {tags[key]} | "
                    + " | ".join(by_layer.get(x, "") for x in layers) + " |")
    return "\n".join(rows)


def _detail_table(result: dict[str, Any], layer: int) -> str:
    rows = ["| pair | cos mean | cos min | cos p5 | mc cos mean | Procrustes cos | raw r | mc r "
            "| mc Spearman | Mantel p | spread ρ | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        if c["layer"] != layer:
            continue
        s, mc = c["per_persona_cos"], c["per_persona_cos_mc"]
        rows.append(
            f"| {c['pair'][0]} ~ {c['pair'][1]} | {_f(s['mean'])} | {_f(s['min'])} | {_f(s['p5'])} "
            f"| {_f(mc['mean'])} | {_f(c['procrustes_cos']['mean'])} | {_f(c['matrix_raw']['pearson'])} "
            f"| {_f(c['matrix_mc']['pearson'])} | {_f(c['matrix_mc']['spearman'])} "
            f"| {c['mantel_p']:.4f} | {_f(c['spread']['spearman'])} | **{c['verdict']}** |")
    return "\n".join(rows)


def _floor_table(result: dict[str, Any]) -> str:
    rows = ["| recipe | layer | per-persona cos (mean / min) | mc matrix r (mean / min) |",
            "|---|---|---|---|"]
    for pos, by_layer in result["noise_floor"].items():
        for layer, v in by_layer.items():
            if v.get("exact") is False:
                rows.append(f"| {pos} | {layer} | {_f(v['per_persona_cos_mean'], 4)} / "
                            f"{_f(v['per_persona_cos_min'], 4)} | {_f(v['matrix_mc_pearson_mean'], 4)}"
                            f" / {_f(v['matrix_mc_pearson_min'], 4)} |")
            else:
                rows.append(f"| {pos} | {layer} | {v['reason']} | — |")
    return "\n".join(rows)


def _bstar_section(result: dict[str, Any]) -> str:
    b = result["bstar_check"]
    if not b.get("available"):
        return f"Not available: {b['reason']}."
    rows = ["| layer | cos(A, B*) mean / min | cos(A, B*_no_last) mean / min | identity max rel. error |",
            "|---|---|---|---|"]
    for layer, r in b["layers"].items():
        ident = r.get("identity_max_rel_error")
        ok = "" if ident is None else (" (holds)" if r["identity_holds"] else " (FAILS)")
        rows.append(f"| {layer} | {_f(r['cos_a_bstar']['mean'])} / {_f(r['cos_a_bstar']['min'])} | "
                    f"{_f(r['cos_a_bstar_no_last']['mean'])} / {_f(r['cos_a_bstar_no_last']['min'])} | "
                    f"{'n/a' if ident is None else f'{ident:.2e}'}{ok} |")
    note = b.get("identity_note")
    return "\n".join(rows) + (f"\n\n{note}." if note else "")


def write_report(result: dict[str, Any], source: Any, out: str | Path,
                 title: str = "Recipe comparison") -> Path:
    """Write results.json, figures/*.png and report.md into ``out``; returns report.md's path."""
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", json.dumps(result, indent=1).encode())
    layers = result["layers"]
    mid = layers[len(layers) // 2]
    plots.verdict_heatmap(result, figs / "verdicts.png")
    plots.cosine_violins(result, mid, figs / f"cosines_L{mid}.png")
    plots.matrix_bars(result, mid, figs / f"matrix_r_L{mid}.png")
    plots.cosine_matrices(source, result["positions"], mid, figs / f"cos_matrices_L{mid}.png")
    th = result["thresholds"]
    sig = sorted((t for t in result["paired_tests"] if t["p"] < 0.05), key=lambda t: t["p"])[:10]
    lines = [
        f"# {title}", "",
        f"**{result['overall']['sentence']}**", "",
        f"{result['n_personas']} personas, {result['n_questions']} questions, layers "
        f"{', '.join(map(str, layers))}; {result['n_permutations']} Mantel permutations "
        f"(smallest attainable p = {result['min_attainable_p']:.4f}), seed {result['seed']}; "
        f"input manifest {result['input']['manifest_hash'][:12]}.", "",
        f"Verdicts: PASS if per-persona min cos > {th['pass_min_cos']} and mean-centred matrix "
        f"r > {th['pass_mc_r']} (and spread Spearman > {th['pass_spread']} where defined); KILL if "
        f"min cos < {th['kill_min_cos']} or mean-centred r < {th['kill_mc_r']}; GREY otherwise.", "",
        "## Verdicts", "", verdict_table(result), "", "![verdicts](figures/verdicts.png)", "",
    ]
    for pos, by_persona in result.get("missing_rows", {}).items():
        listed = ", ".join(f"{k} ({v})" for k, v in by_persona.items())
        lines += [f"Missing rows for {pos} (left out of its centroids): {listed}.", ""]
    for layer in layers:
        lines += [f"## Layer {layer}", "", _detail_table(result, layer), ""]
    lines += [
        f"![cosines](figures/cosines_L{mid}.png)", "", f"![matrix r](figures/matrix_r_L{mid}.png)", "",
        f"![cosine matrices](figures/cos_matrices_L{mid}.png)", "",
        "## Split-half noise floor", "",
        f"Centroids from two random halves of the questions ({result['n_splits']} seeded splits), "
        "compared with the same statistics as the recipe pairs.", "", _floor_table(result), "",
        "## B*_no_last algebra check", "",
        "B* (prompt_mean) includes A's token (last) in its mean, so part of cos(A, B*) is "
        "arithmetic; B*_no_last removes it.", "", _bstar_section(result), "",
        "## Paired permutation tests", "",
        f"{len(result['paired_tests'])} tests of whether one pair is more aligned than another "
        f"pair sharing a recipe (sign flips across personas). Smallest p-values:", "",
        "| layer | pair 1 | pair 2 | mean cos difference | p |", "|---|---|---|---|---|",
        *[f"| {t['layer']} | {' ~ '.join(t['pair_1'])} | {' ~ '.join(t['pair_2'])} | "
          f"{t['mean_diff']:+.4f} | {t['p']:.4f} |" for t in sig],
        "",
    ]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def write_subspace(result: dict[str, Any], comps: dict[int, Any], source: Any,
                   out: str | Path) -> str:
    """Write subspace.json, pcs.safetensors and figures into ``out``; return a markdown section."""
    import numpy as np
    import torch

    from tlpersona.analyses.subspace import prepare
    from tlpersona.files import atomic_save_tensors

    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "subspace.json", json.dumps(result, indent=1).encode())
    atomic_save_tensors(out / "pcs.safetensors",
                        {f"layer_{k}": torch.from_numpy(np.ascontiguousarray(v)).float()
                         for k, v in comps.items()})
    layers = result["layers"]
    mid = layers[len(layers) // 2]
    li = source.layer_index(mid["layer"])
    coords = {p: prepare(source.centroids(p)[:, li].double().numpy(), result["unit_norm"])
              @ comps[mid["layer"]][:2].T for p in result["positions"]}
    plots.subspace_variance(mid, figs / f"subspace_variance_L{mid['layer']}.png")
    plots.subspace_agreement(mid, result["thresholds"], figs / f"subspace_agreement_L{mid['layer']}.png")
    plots.subspace_scatter(coords, mid["layer"], figs / f"subspace_pc12_L{mid['layer']}.png")
    rows = ["| layer | k_found | largest passing K | held-out: k_found / largest passing K "
            "| variance of the first shared PC |", "|---|---|---|---|---|"]
    for lay in layers:
        rows.append(f"| {lay['layer']} | {lay['k_found']} | {lay['k_largest_passing']} | "
                    f"{lay['k_found_held_out']} / {lay['k_largest_passing_held_out']} | "
                    f"{lay['explained_variance_ratio'][0]:.3f} |")
    th = result["thresholds"]
    lines = [
        "## Shared persona subspace", "",
        f"One PCA on every recipe's mean-centred centroids ({', '.join(result['positions'])}"
        f"{', each scaled to unit norm' if result['unit_norm'] else ''}). k_found is the largest K "
        f"up to which every recipe pair, projected onto the top-K shared PCs, keeps per-persona "
        f"min cos > {th['min_cos']} and mean-centred matrix r > {th['min_r']} (none if K = 1 "
        "fails; small K is trivially agreeable: a 1-D projection makes every cosine ±1); the "
        "largest passing K ignores failures at smaller K. Held-out: PCs fitted on half of the "
        "personas, scored on the other half.", "",
        *rows, "",
        f"![variance](figures/subspace_variance_L{mid['layer']}.png)", "",
        f"![agreement](figures/subspace_agreement_L{mid['layer']}.png)", "",
        f"![PC1-PC2](figures/subspace_pc12_L{mid['layer']}.png)", "",
    ]
    return "\n".join(lines)


def write_patch(patching: dict[str, Any], out: str | Path) -> str:
    """Write patch.json and figures into ``out``; return a markdown section."""
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "patch.json", json.dumps({"patching": patching}, indent=1).encode())
    lines = ["## Activation patching", ""]
    plots.patching_heatmap(patching, figs / "patching.png")
    cfg = patching["config"]
    layers = patching["layers"]
    by = {(c["position"], c["layer"]): c for c in patching["cells"]}
    rows = ["| position | " + " | ".join(f"L{x}" for x in layers) + " |",
            "|---|" + "---|" * len(layers)]
    for pos in patching["positions"]:
        cells = [by.get((pos, la)) for la in layers]
        rows.append(f"| {pos} | " + " | ".join(
            "" if c is None else f"{_f(c['kl_effect'], 2)} / {_f(c['ld_effect'], 2)}"
            for c in cells) + " |")
    top = sorted(patching["cells"], key=lambda c: -c["kl_effect"])[:5]
    read = ("the last prompt token" if not cfg["response_tokens"] else
            f"the last prompt token and {cfg['response_tokens']} teacher-forced response tokens")
    lines += [
        "### Patching", "",
        f"Clean: a persona's system prompt + question; corrupt: "
        f"{'the next persona' if cfg['corrupt'] == 'next' else repr(cfg['corrupt'])} with the "
        f"same question ({len(patching['pairs'])} pairs × {len(patching['questions'])} "
        f"questions). `{cfg['hook']}` at one named position and layer copied from clean into "
        f"corrupt; next-token distributions read at {read}. Effect 0 = corrupt, 1 = clean "
        f"(KL / logit difference, ratios of sums over examples). Mean KL(clean || corrupt) = "
        f"{_f(patching['kl_clean_corrupt_mean'])}. `sys_start+i` rows are system-text tokens "
        "aligned by index from the start of the system text.", "",
        *rows, "",
        "Largest KL effects: " + "; ".join(f"{c['position']} L{c['layer']} "
                                           f"{_f(c['kl_effect'], 2)}" for c in top) + ".", "",
        "![patching](figures/patching.png)", "",
    ]
    section = "\n".join(lines)
    atomic_write_bytes(out / "patch.md", section.encode())
    return section
