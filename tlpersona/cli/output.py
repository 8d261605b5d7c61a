"""What the commands print of a result: the few lines a terminal shows, the full report being
in the files the result writes. The experiment prints what the single commands print."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from tlpersona.cli.errors import flags

if TYPE_CHECKING:
    from tlpersona.api.trajectory import TrajectoryResult


def print_summary(result: Any) -> None:
    from tlpersona.report.compare import verdict_table

    click.echo(verdict_table(result.to_dict()))
    click.echo(result.answer)
    for note in result.notes:
        click.echo(f"- {note}")


def found(k: Any) -> str:
    """A :class:`~tlpersona.api.results.KFound` on one line: the count and its null."""
    from tlpersona.analyses.subspace_result import null_text

    return (f"k_found {k} (held-out personas; relabelled personas (descriptive): "
            f"{null_text({'k_found_null': k.null, 'k_found_null_p': k.null_p})})")


def subspace_line(lay: Any) -> str:
    return f"layer {lay.layer}: {found(lay.k_found)}"


def print_trajectory(result: TrajectoryResult) -> None:
    for c in result.conversations:
        turns = " -> ".join(f"{t.value:+.3g}" for t in c.turns)
        click.echo(f"{c.label} ({c.persona or 'no stored persona'}): {turns}")
    for line in result.flags:
        click.echo(f"flag: {line}")
    for note in result.notes:
        click.echo(f"note: {flags(note)}")


def print_patch(result: Any) -> None:
    click.echo(f"patching, clean personas: {', '.join(x for x, _ in result.pairs)} "
               f"({result.personas_note})")
    for method in ("exact", "attribution"):
        cells = result.select(method, result.config.hook)
        if cells:
            click.echo(f"patching ({method}, {result.config.hook}): {len(cells)} cells")
    click.echo(f"rewording control: {result.control_note}")
    click.echo(f"persona beyond the rewording control: {result.answer()}")


def print_steer(result: Any) -> None:
    for sentence in result.verdicts.values():
        click.echo("steering " + sentence)
