"""Figures, tables and the markdown section of a trajectory result (no model, no store)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlpersona.analyses.trajectory import Band, ConversationTrajectory
from tlpersona.infra.files import atomic_write_bytes, json_bytes
from tlpersona.report.plots import distinct_colours, save_figure, subplots
from tlpersona.report.section import Section, write_section

if TYPE_CHECKING:
    from tlpersona.api.trajectory import TrajectoryResult

#: Figures are drawn for the first this many conversations (every one is in the files).
MAX_FIGURES = 20
STORED_COLOUR, OWN_COLOUR, FLAG_COLOUR = "0.85", "#f0c987", "#d9534f"


def _band_label(b: Band, what: str) -> str:
    return f"{what} [{b.lo:+.3g}, {b.hi:+.3g}]"


def _spans(ax: Any, stored: Band, own: Band | None, persona: str | None) -> None:
    ax.axhspan(stored.lo, stored.hi, color=STORED_COLOUR, zorder=0,
               label=_band_label(stored, f"stored personas ({stored.n})"))
    if own is not None:
        ax.axhspan(own.lo, own.hi, color=OWN_COLOUR, alpha=0.6, zorder=0.5,
                   label=_band_label(own, f"{persona}'s own ({own.n} readings)"))


def conversation_figure(conv: ConversationTrajectory, stored: Band, axis_name: str, where: str,
                        path: Path, number: int = 1) -> Path:
    """One conversation: each assistant turn's value (the mean of its tokens) joined in order,
    its tokens as faint dots, flagged turns ringed, over the stored personas' band and the
    conversation's own persona's band."""
    fig, ax = subplots(figsize=(2.6 + 0.75 * len(conv.turns), 3.4), layout="constrained")
    _spans(ax, stored, conv.own_band, conv.persona)
    x = np.arange(1, len(conv.turns) + 1)
    shown = [stored.lo, stored.hi]
    for t in conv.turns:
        v = conv.turn_tokens(t)
        ax.plot(t.index + np.linspace(-0.18, 0.18, v.size), v, ".", ms=2.5, color="0.45",
                alpha=0.45, zorder=1, label="tokens" if t.index == 1 else None)
        shown += list(np.percentile(v, [5, 95]))
    values = [t.value for t in conv.turns]
    ax.plot(x, values, "-o", color="C0", ms=5, zorder=3, label="turn (mean of its tokens)")
    flagged = [t for t in conv.turns if t.own not in (None, "inside")]
    if flagged:
        ax.plot([t.index for t in flagged], [t.value for t in flagged], "o", ms=11, mfc="none",
                mec=FLAG_COLOUR, mew=1.5, zorder=4, label="outside its own band")
    if conv.own_band is not None:
        shown += [conv.own_band.lo, conv.own_band.hi]
    lo, hi = min(shown + values), max(shown + values)
    pad = 0.08 * (hi - lo or 1.0)
    ax.set_ylim(lo - pad, hi + pad)  # a few extreme tokens do not squash the turns
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlim(0.5, len(conv.turns) + 0.5)
    ax.set_xlabel("assistant turn")
    ax.set_ylabel(axis_name, fontsize=8)
    ax.set_title(f"{number}. {_short(conv.label, 48)}\n{where}", fontsize=8)
    fig.legend(loc="outside lower center", ncol=2, fontsize=6.5, frameon=False)
    return save_figure(fig, path)


def token_heatmap(conv: ConversationTrajectory, axis_name: str, where: str, path: Path,
                  number: int = 1) -> Path:
    """One row per message, one cell per content token (in order), coloured by the token's value
    (0 = the stored personas' mean); template tokens between messages are left out."""
    import matplotlib

    rows = [np.asarray(conv.values[m.start:m.stop]) for m in conv.messages]
    width = max(r.size for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, : r.size] = r
    finite = grid[np.isfinite(grid)]
    lim = float(np.percentile(np.abs(finite), 98)) or 1.0
    fig, ax = subplots(figsize=(min(12.0, 2.5 + 0.06 * width), 0.9 + 0.32 * len(rows)),
                       layout="constrained")
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
    im = ax.imshow(grid, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    counts: dict[str, int] = {}
    labels = []
    for m in conv.messages:
        counts[m.role] = counts.get(m.role, 0) + 1
        labels.append(m.role if m.role == "system" else f"{m.role} {counts[m.role]}")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlabel("token within the message", fontsize=8)
    ax.set_title(f"{number}. {_short(conv.label, 60)}: every token, {where}", fontsize=8)
    bar = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.01)
    bar.set_label(axis_name, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return save_figure(fig, path)


def overview_figure(result: TrajectoryResult, path: Path) -> Path:
    """Every conversation's assistant turns on one axis, over the stored personas' band."""
    convs = result.conversations[:MAX_FIGURES]
    most = max(len(c.turns) for c in convs)
    fig, ax = subplots(figsize=(3.0 + 0.7 * most, 3.4), layout="constrained")
    _spans(ax, result.stored_band, None, None)
    for n, (c, colour) in enumerate(zip(convs, distinct_colours(len(convs)), strict=True), 1):
        x = [t.index for t in c.turns]
        # numbered as the per-conversation figures are: labels may share their start
        ax.plot(x, [t.value for t in c.turns], "-o", ms=4, color=colour,
                label=f"{n}. {_short(c.label, 40)}")
        out = [t for t in c.turns if t.own not in (None, "inside")]
        ax.plot([t.index for t in out], [t.value for t in out], "o", ms=10, mfc="none",
                mec=FLAG_COLOUR, mew=1.3)
    ax.set_xticks(range(1, most + 1), [str(i) for i in range(1, most + 1)])
    ax.set_xlim(0.5, most + 0.5)
    ax.set_xlabel("assistant turn")
    ax.set_ylabel(result.axis_name, fontsize=8)
    ax.set_title(f"Assistant turns on the {result.axis_name}, {_where(result)}\n"
                 "(red ring: outside its own persona's band)", fontsize=8)
    fig.legend(loc="outside lower center", ncol=2, fontsize=6.5, frameon=False)
    return save_figure(fig, path)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _where(result: TrajectoryResult) -> str:
    return f"layer {result.layer}, {result.position} frame"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _alt(text: str) -> str:
    """``text`` as an image's alt text (no brackets or line breaks)."""
    return text.replace("[", "(").replace("]", ")").replace("\n", " ")


def _csv(rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


def write_tables(result: TrajectoryResult, out: Path) -> tuple[Path, Path]:
    """trajectory.csv (one row per assistant turn) and tokens.csv (one per token); returns
    their paths."""
    s = result.stored_band
    turns: list[list[Any]] = [["conversation", "label", "persona", "assistant_turn", "message",
                               "start", "stop", "value", "stored_lo", "stored_hi", "stored_side",
                               "own_lo", "own_hi", "own_side"]]
    tokens: list[list[Any]] = [["conversation", "label", "token", "token_id", "text", "message",
                                "role", "value"]]
    for n, c in enumerate(result.conversations, 1):
        own = c.own_band
        for t in c.turns:
            turns.append([n, c.label, c.persona or "", t.index, t.message, t.start, t.stop,
                          t.value, s.lo, s.hi, t.stored, "" if own is None else own.lo,
                          "" if own is None else own.hi, t.own or ""])
        owner: list[int | None] = [None] * len(c.values)
        for i, msg in enumerate(c.messages):
            owner[msg.start:msg.stop] = [i] * (msg.stop - msg.start)
        for j, (tid, text, v) in enumerate(zip(c.token_ids, c.tokens, c.values, strict=True)):
            at = owner[j]
            tokens.append([n, c.label, j, tid, text, "" if at is None else at,
                           "" if at is None else c.messages[at].role, v])
    atomic_write_bytes(out / "trajectory.csv", _csv(turns))
    atomic_write_bytes(out / "tokens.csv", _csv(tokens))
    return out / "trajectory.csv", out / "tokens.csv"


def _band_text(b: Band | None) -> str:
    if b is None:
        return "—"
    return f"[{b.lo:+.3g}, {b.hi:+.3g}] ({b.n} readings, outside rate {b.outside_rate:.2f})"


def write_trajectory(result: TrajectoryResult, out: Path) -> Section:
    """trajectory.json, tables, figures and trajectory.md into ``out``; returns them as its
    :class:`~tlpersona.report.section.Section`."""
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "trajectory.json", json_bytes(result.to_dict()))
    files = [out / "trajectory.json", *write_tables(result, out)]
    where = _where(result)
    overview = overview_figure(result, figs / "trajectories.png")
    files.append(overview)
    s = result.stored_band
    lo_pct, hi_pct = result.band
    source = ("shared PC from " + result.subspace if result.subspace else
              "shared PC fitted on the stored recipes" if result.axis.startswith("pc:") else
              f"{result.axis.split(':', 1)[1]}'s centroid minus the other personas' mean")
    lines = [
        f"## Drift along the {result.axis_name}", "",
        f"Every token of {len(result.conversations)} conversation(s) read at layer "
        f"{result.layer} (`{result.hook}`, one forward pass per conversation) and projected onto "
        f"the {result.axis_name} ({source}) in the {result.position} frame, where 0 is the "
        f"stored personas' mean centroid; an assistant turn's value is the mean over its content "
        f"tokens. Bands hold the values between the {lo_pct:g}th and {hi_pct:g}th percentiles by "
        f"order statistics. The stored personas' centroids lie in [{s.lo:+.3g}, {s.hi:+.3g}] "
        f"({s.n} personas; a centroid averages a persona's questions, so one turn varies more). A "
        "turn is flagged where it leaves its own persona's band, the persona's per-question "
        "readings; a turn like them is flagged at the band's outside rate (descriptive: one "
        "reading per turn, no correction over turns).", "",
        "| conversation | persona | assistant turns | own band | flagged |", "|---|---|---|---|---|",
    ]
    for c in result.conversations:
        values = " → ".join(f"{t.value:+.3g}" for t in c.turns)
        flagged = sum(t.own not in (None, "inside") for t in c.turns)
        lines.append(f"| {_cell(c.label)} | {c.persona or '—'} | {values} | "
                     f"{_band_text(c.own_band)} | {flagged if c.own_band else '—'} |")
    lines += [""]
    if result.flags:
        lines += ["Turns outside their own persona's band:", "",
                  *[f"- {_cell(f)}" for f in result.flags], ""]
    else:
        lines += ["No turn leaves its own persona's band.", ""]
    lines += [*(f"Note: {_cell(n)}" for n in result.notes), *([""] if result.notes else [])]
    lines += [f"![assistant turns on the {result.axis_name}](figures/{overview.name})", ""]
    shown = result.conversations[:MAX_FIGURES]
    for n, c in enumerate(shown, 1):
        line = conversation_figure(c, s, result.axis_name, where, figs / f"trajectory_{n}.png", n)
        heat = token_heatmap(c, result.axis_name, where, figs / f"tokens_{n}.png", n)
        files += [line, heat]
        lines += [f"![{n}. {_alt(c.label)}: turns](figures/{line.name}) "
                  f"![{n}. {_alt(c.label)}: tokens](figures/{heat.name})", ""]
    if len(result.conversations) > len(shown):
        lines += [f"Figures for the first {len(shown)} conversations; every conversation's turns "
                  "and tokens are in trajectory.csv and tokens.csv.", ""]
    lines += ["Files: trajectory.json (everything), trajectory.csv (one row per assistant turn), "
              "tokens.csv (one row per token).", ""]
    return write_section(out / "trajectory.md", "\n".join(lines), files)
