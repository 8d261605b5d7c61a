"""What a renderer that writes a markdown section gives back: the section's markdown and every
file it wrote, so that a report made of sections is stitched in memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tlpersona.infra.files import atomic_write_bytes


@dataclass(frozen=True)
class Section:
    """``markdown``: the section's text, exactly the bytes of its markdown file decoded;
    ``files``: the files the renderer wrote, in the order written, its markdown file last."""

    markdown: str
    files: tuple[Path, ...]


def write_section(path: Path, markdown: str, files: Sequence[Path] = ()) -> Section:
    """Write ``markdown`` to ``path`` (UTF-8, through a temporary file and a rename) and return
    it as the section of ``files`` (written before it) and ``path``."""
    atomic_write_bytes(path, markdown.encode())
    return Section(markdown, (*files, path))
