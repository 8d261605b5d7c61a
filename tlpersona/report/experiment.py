"""The experiment's report: its first screen answers the questions the run exists for,
one sentence each with its numbers; every table follows in details.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tlpersona.report.section import Section, write_section

#: A headline longer than this no longer reads at a glance.
HEADLINE_CHARS = 300


@dataclass(frozen=True)
class Answer:
    """One question of the first screen, its one-sentence answer and its section's file."""

    question: str
    text: str
    section: str  # markdown file beside the report with the section's tables


def write_experiment_report(out: Path, title: str, headline: str, answers: Sequence[Answer],
                            run: str, figures: Sequence[tuple[str, str]],
                            sections: Sequence[Section]) -> Section:
    """report.md (headline, answers, the run in one line, figures) and details.md (every
    section in full, stitched from ``sections``' markdown in their order) into ``out``;
    ``figures``: (caption, path relative to ``out``) that exist. Returns report.md's
    :class:`~tlpersona.report.section.Section` (details.md and report.md)."""
    if len(headline) > HEADLINE_CHARS:
        raise ValueError(f"headline of {len(headline)} characters (at most {HEADLINE_CHARS})")
    lines = [f"# {title}", "", f"**{headline}**", ""]
    for i, a in enumerate(answers):
        lines += [f"{chr(ord('a') + i)}. **{a.question}** {a.text} "
                  f"([{a.section}]({a.section}))", ""]
    lines += [run, "", *[f"![{cap}]({rel})\n" for cap, rel in figures if (out / rel).exists()],
              "Every table: [details.md](details.md); every compared cell's numbers: "
              "[cells.csv](cells.csv) (one row per layer × recipe pair).", ""]
    stitched = write_section(out / "details.md",
                             "\n\n".join(s.markdown.rstrip() for s in sections) + "\n")
    return write_section(out / "report.md", "\n".join(lines), stitched.files)
