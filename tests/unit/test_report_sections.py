"""The section convention of report/: a renderer that writes a markdown file returns a
``Section`` (its markdown and the files it wrote), and the experiment's report is stitched
from those in memory."""

from __future__ import annotations

import ast
from pathlib import Path

from tlpersona.report.experiment import Answer, write_experiment_report
from tlpersona.report.section import Section, write_section

REPORT = Path(__file__).resolve().parents[2] / "tlpersona" / "report"


def test_every_markdown_writer_returns_a_section():
    """A public ``write_*`` of report/ that names a .md file returns a Section."""
    found = []
    for path in sorted(REPORT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("write_"):
                continue
            names_md = any(isinstance(c, ast.Constant) and isinstance(c.value, str)
                           and c.value.endswith(".md") for c in ast.walk(node))
            if names_md:
                found.append((path.name, node.name, ast.unparse(node.returns or ast.Constant(None))))
    assert found and all(ret == "Section" for *_, ret in found), found


def test_a_section_is_the_bytes_it_wrote(tmp_path):
    md = "## A section\n\nnon-ASCII: ρ ≤ 0.5 — ok\n"
    figure = tmp_path / "figures" / "a.png"
    got = write_section(tmp_path / "a.md", md, [figure])
    assert got == Section(md, (figure, tmp_path / "a.md"))
    assert (tmp_path / "a.md").read_bytes() == md.encode()


def test_the_experiment_report_stitches_sections_in_memory(tmp_path):
    """details.md holds the sections' markdown, each right-stripped, blank-line separated, as
    given: a section's file on disk is not read back."""
    (tmp_path / "fig.png").write_bytes(b"")
    one = Section("## One\n\ntext\n\n\n", ())
    two = write_section(tmp_path / "two.md", "## Two\n\nmore  ")
    (tmp_path / "two.md").write_text("changed on disk")
    report = write_experiment_report(
        tmp_path, "Title", "Headline.", [Answer("Q?", "A.", "two.md")], "The run.",
        [("a figure", "fig.png"), ("missing", "gone.png")], [one, two])
    assert (tmp_path / "details.md").read_text() == "## One\n\ntext\n\n## Two\n\nmore\n"
    assert report.files == (tmp_path / "details.md", tmp_path / "report.md")
    assert (tmp_path / "report.md").read_text() == report.markdown
    assert "![a figure](fig.png)" in report.markdown and "gone.png" not in report.markdown
