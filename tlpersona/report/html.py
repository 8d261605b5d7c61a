"""One offline HTML page of an analysis output folder: ``report.html`` beside its report.md.

The page is a single file a reader can mail or open from a USB stick: the folder's summary
(report.md, or the analysis's own markdown) first, then details.md, every figure embedded as a
``data:`` URI, every table sortable by a click on its header (a small inline script), and a
footer naming the store's manifest hash and the code version the result files record. It loads
nothing: its Content-Security-Policy admits no network, file or font resource, only the inline
script and style it carries (by their hashes) and ``data:`` images.

Markdown is rendered by markdown-it-py (CommonMark and its table extension) with raw HTML off,
so persona names, prompts and responses quoted in a report are text, never markup."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.token import Token

from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import atomic_write_bytes

HTML_NAME = "report.html"
#: The folder's summary, in order of preference: the experiment's and compare's report.md,
#: else the one analysis's own markdown (subspace, patch, steer write no report.md).
SUMMARY_NAMES = ("report.md", "subspace.md", "patch.md", "steering.md", "trajectory.md")
DETAILS_NAME = "details.md"
FIGURES_DIR = "figures"

#: result file -> the key paths where it records the store's manifest hash
_MANIFEST_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "results.json": (("input", "manifest_hash"),),
    "subspace.json": (("input", "manifest_hash"),),
    "patch.json": (("patching", "inputs", "store_manifest_hash"),),
    "steering.json": (("inputs", "store_manifest_hash"), ("store_manifest_hash",)),
    "projection.json": (("inputs", "store_manifest_hash"),),
    "trajectory.json": (("inputs", "store_manifest_hash"),),
    "cross_model.json": (("a", "manifest_hash"), ("b", "manifest_hash")),  # the two stores
}
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".gif": "image/gif", ".webp": "image/webp", ".svg": "image/svg+xml"}
#: a link target with a scheme (``https:``, ``mailto:``) or a network path (``//host``)
_EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)
_ALIGN = re.compile(r"^text-align:(left|right|center)$")


@dataclass(frozen=True)
class Provenance:
    """What the footer names, read from the folder's result files: each distinct store
    manifest hash and code version with the files that record it (several values mean the
    files were not written by one run), and the result files that could not be read."""

    manifest_hashes: dict[str, list[str]] = field(default_factory=dict)  # hash -> files
    code_versions: dict[str, list[str]] = field(default_factory=dict)  # version -> files
    unreadable: list[str] = field(default_factory=list)


def summary_file(folder: Path) -> Path | None:
    """The markdown file a page of ``folder`` opens with; None where it holds none (a
    projection writes no markdown)."""
    for name in SUMMARY_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def _lookup(data: object, path: Sequence[str]) -> str | None:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data if isinstance(data, str) and data else None


def read_provenance(folder: Path) -> Provenance:
    """The manifest hashes and code versions that ``folder``'s result files record."""
    hashes_found: dict[str, list[str]] = {}
    versions: dict[str, list[str]] = {}
    unreadable: list[str] = []
    for name, paths in _MANIFEST_KEYS.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            unreadable.append(name)
            continue
        for h in sorted({h for p in paths if (h := _lookup(data, p)) is not None}):
            hashes_found.setdefault(h, []).append(name)
        if (version := _lookup(data, ("code_version",))) is not None:
            versions.setdefault(version, []).append(name)
    return Provenance(hashes_found, versions, unreadable)


class _Page:
    """One page being rendered: the folder its relative paths resolve against, the markdown
    files shown on it (links to them become in-page anchors, as do links to a file beside
    whose first heading is one of the page's headings) and the figures embedded so far."""

    def __init__(self, folder: Path, shown: dict[str, str]) -> None:
        self.folder = folder.resolve()
        self.shown = shown  # markdown file name -> its section's id
        self.headings: dict[str, str] = {}  # a heading's markdown -> its id (the first such)
        self.ids = {*shown.values(), "figures"}  # the sections' ids
        self.embedded: dict[Path, str] = {}  # figure -> its data URI
        self.md = MarkdownIt("commonmark", {"html": False}).enable("table")
        # wide tables scroll in their own box instead of widening the page
        self.md.add_render_rule("table_open",
                                lambda *_: '<div class="table-wrap"><table class="sortable">\n')
        self.md.add_render_rule("table_close", lambda *_: "</table></div>\n")

    def inside(self, rel: str) -> Path | None:
        """The file ``rel`` (a link or image target) names inside the folder; None for anything
        else (a URL, an absolute path, a path leaving the folder, a missing file)."""
        if not rel or _EXTERNAL.match(rel) or rel.startswith("/"):
            return None
        path = (self.folder / urllib.parse.unquote(rel)).resolve()  # markdown-it %-encodes
        return path if path.is_relative_to(self.folder) and path.is_file() else None

    def figure(self, src: str) -> Path | None:
        path = self.inside(src)
        return path if path is not None and path.suffix.lower() in _IMAGE_TYPES else None

    def data_uri(self, path: Path) -> str:
        if path not in self.embedded:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise TlpersonaError(f"cannot read {path}: {exc.strerror or exc}") from None
            self.embedded[path] = (f"data:{_IMAGE_TYPES[path.suffix.lower()]};base64,"
                                   + base64.b64encode(data).decode("ascii"))
        return self.embedded[path]

    def parse(self, text: str) -> list[Token]:
        """``text``'s tokens, each heading given a unique id."""
        tokens = self.md.parse(text)
        for tok, nxt in zip(tokens, tokens[1:], strict=False):
            if tok.type == "heading_open":
                slug = re.sub(r"\W+", "-", nxt.content.lower()).strip("-") or "section"
                uid, n = slug, 1
                while uid in self.ids:
                    n += 1
                    uid = f"{slug}-{n}"
                self.ids.add(uid)
                tok.attrSet("id", uid)
                self.headings.setdefault(nxt.content, uid)
        return tokens

    def anchor(self, target: str) -> str | None:
        """The in-page anchor of a markdown file a link names; None where the page lacks it."""
        if target in self.shown:
            return self.shown[target]
        path = self.inside(target)
        if path is None or path.suffix != ".md":
            return None
        return self.headings.get(_first_heading(_read_md(path)) or "")

    def _inline(self, children: list[Token]) -> list[Token]:
        out: list[Token] = []
        dropping = False
        for tok in children:
            if tok.type == "link_open":
                href = str(tok.attrGet("href") or "")
                if _EXTERNAL.match(href):
                    dropping = True  # its text stays, as text: the page links to no network
                    continue
                if (uid := self.anchor(href.split("#", 1)[0])) is not None:
                    tok.attrSet("href", "#" + uid)
            elif tok.type == "link_close" and dropping:
                dropping = False
                continue
            elif tok.type == "image":
                src = str(tok.attrGet("src") or "")
                path = self.figure(src)
                if path is None:
                    missing = Token("text", "", 0)
                    missing.content = f"[figure missing: {urllib.parse.unquote(src)}]"
                    out += [Token("em_open", "em", 1), missing, Token("em_close", "em", -1)]
                    continue
                tok.attrSet("src", self.data_uri(path))
            out.append(tok)
        return out

    def render(self, tokens: list[Token]) -> str:
        """HTML of parsed tokens (every file of the page is parsed first, so that a link
        reaches a heading further down the page)."""
        for tok in tokens:
            if tok.type == "inline" and tok.children is not None:
                tok.children = self._inline(tok.children)
            elif tok.type in ("th_open", "td_open"):
                # column alignment as a class: the policy admits no inline style attribute
                m = _ALIGN.match(str(tok.attrGet("style") or ""))
                if m:
                    tok.attrs.pop("style", None)
                    tok.attrSet("class", f"align-{m.group(1)}")
        return str(self.md.renderer.render(tokens, self.md.options, {}))


def _first_heading(text: str) -> str | None:
    """The markdown of a text's first ATX heading."""
    for line in text.splitlines():
        if m := re.match(r"^ {0,3}#{1,6}\s+(.*?)(\s+#+)?\s*$", line):
            return m.group(1)
    return None


def _read_md(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TlpersonaError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise TlpersonaError(f"cannot read {path}: {exc.strerror or exc}") from None


def _footer(prov: Provenance) -> str:
    def values(found: dict[str, list[str]]) -> str:
        if not found:
            return "not recorded"
        return "; ".join(f"<code>{html.escape(v)}</code> ({html.escape(', '.join(files))})"
                         for v, files in found.items())

    parts = [f"Store manifest hash: {values(prov.manifest_hashes)}",
             f"code version: {values(prov.code_versions)}"]
    if prov.unreadable:
        parts.append("unreadable: " + html.escape(", ".join(prov.unreadable)))
    return "<footer>\n<p>" + ".<br>\n".join(parts) + ".</p>\n</footer>\n"


_STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color: #1d1f23; margin: 0 auto; max-width: 1200px; padding: 1.5rem 2rem; }
h1 { font-size: 1.6rem; margin-top: 0; } h2 { font-size: 1.3rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.1rem; }
section.summary { background: #f5f7fa; border: 1px solid #dde3ea; border-radius: 6px;
                  padding: 1rem 1.5rem; margin-bottom: 2rem; }
img { max-width: 100%; height: auto; display: block; margin: 0.5rem 0; }
code { font: 0.9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
       background: #eef0f3; padding: 0 0.2em; border-radius: 3px; word-break: break-all; }
.table-wrap { overflow-x: auto; margin: 0.5rem 0 1rem; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border: 1px solid #d0d5dc; padding: 0.2rem 0.45rem; vertical-align: top; }
td { white-space: nowrap; }
thead th { background: #e9edf2; cursor: pointer; user-select: none; text-align: left; }
thead th::after { content: " \\2195"; color: #98a1ad; }
thead th[aria-sort="ascending"]::after { content: " \\25B2"; color: #1d1f23; }
thead th[aria-sort="descending"]::after { content: " \\25BC"; color: #1d1f23; }
tbody tr:nth-child(even) { background: #fafbfc; }
.align-left { text-align: left; } .align-right { text-align: right; }
.align-center { text-align: center; }
footer { border-top: 1px solid #ccc; margin-top: 2rem; padding-top: 0.5rem; font-size: 0.85rem;
         color: #4a505a; }
"""

# Sorting: a column whose every filled cell starts with a number sorts by that number (cells
# such as "0.787 (0.787; 0.983)" by their value, "n/a" and blanks last either way); any other
# column sorts as text, digits by their value. Ties keep their current order.
_SCRIPT = """
(function () {
  "use strict";
  var collator = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});
  var NUMBER = /^[-+\\u2212]?(\\d+\\.?\\d*|\\.\\d+)(e[-+]?\\d+)?/i;
  var MISSING = {"": 1, "n/a": 1, "nan": 1, "none": 1, "\\u2014": 1, "-": 1};
  function key(cell) {
    var text = cell ? cell.textContent.trim() : "";
    var m = NUMBER.exec(text);
    return {text: text, missing: MISSING.hasOwnProperty(text.toLowerCase()),
            num: m ? parseFloat(m[0].replace("\\u2212", "-")) : NaN};
  }
  function sortBy(table, col, th) {
    var body = table.tBodies[0];
    if (!body) { return; }
    var rows = Array.prototype.slice.call(body.rows).map(function (row, i) {
      return {row: row, i: i, k: key(row.cells[col])};
    });
    var numeric = rows.some(function (r) { return !isNaN(r.k.num); }) &&
      rows.every(function (r) { return r.k.missing || !isNaN(r.k.num); });
    var up = th.getAttribute("aria-sort") !== "ascending";
    rows.sort(function (a, b) {
      var d;
      if (numeric) {
        var am = isNaN(a.k.num), bm = isNaN(b.k.num);
        if (am || bm) { return am === bm ? a.i - b.i : (am ? 1 : -1); }
        d = a.k.num - b.k.num;
      } else {
        d = collator.compare(a.k.text, b.k.text);
      }
      return (up ? d : -d) || a.i - b.i;
    });
    Array.prototype.forEach.call(th.parentNode.cells, function (h) {
      h.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    rows.forEach(function (r) { body.appendChild(r.row); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    if (!table.tHead || !table.tHead.rows.length) { return; }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = "Sort by this column";
      th.addEventListener("click", function () { sortBy(table, col, th); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, col, th); }
      });
    });
  });
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _images(tokens: list[Token]) -> list[str]:
    return [str(c.attrGet("src") or "") for t in tokens for c in (t.children or [])
            if c.type == "image"]


def render_html(folder: str | Path) -> str:
    """The page of ``folder`` (see the module's docstring) as text. Figures named in the
    markdown that are not image files inside ``folder`` show as "[figure missing: …]"; figures
    in ``folder/figures`` that no markdown names follow at the end."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TlpersonaError(f"`folder` {folder} is not a directory")
    summary = summary_file(folder)
    if summary is None:
        raise TlpersonaError(f"`folder` {folder} holds no report to render (none of "
                             f"{', '.join(SUMMARY_NAMES)})")
    parts = [(summary, "summary")]
    if (folder / DETAILS_NAME).is_file():
        parts.append((folder / DETAILS_NAME, "details"))
    page = _Page(folder, {p.name: sid for p, sid in parts})
    summary_text = _read_md(summary)
    parsed = [page.parse(summary_text), *(page.parse(_read_md(p)) for p, _ in parts[1:])]
    named = {page.figure(src) for tokens in parsed for src in _images(tokens)}
    figs = folder / FIGURES_DIR
    rest = sorted(f for f in (p.resolve() for p in figs.iterdir()) if f not in named
                  and f.is_file() and f.is_relative_to(page.folder)
                  and f.suffix.lower() in _IMAGE_TYPES) if figs.is_dir() else []
    body = [f'<section id="{sid}" class="{sid}">\n{page.render(tokens)}</section>\n'
            for (_, sid), tokens in zip(parts, parsed, strict=True)]
    if rest:  # built here, not as markdown: a file name may hold any character
        body.append('<section id="figures" class="figures">\n<h2>Other figures</h2>\n'
                    + "".join(f'<p><img src="{page.data_uri(f)}" alt="{html.escape(f.name)}"></p>\n'
                              for f in rest) + "</section>\n")
    title = re.sub(r"`|\*\*", "", _first_heading(summary_text) or folder.name)
    csp = (f"default-src 'none'; img-src data:; style-src {_csp_hash(_STYLE)}; "
           f"script-src {_csp_hash(_SCRIPT)}; base-uri 'none'; form-action 'none'")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<link rel="icon" href="data:,">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            "<main>\n" + "".join(body) + "</main>\n" + _footer(read_provenance(folder))
            + f"<script>{_SCRIPT}</script>\n</body>\n</html>\n")


def write_html(folder: str | Path) -> Path:
    """Write ``folder/report.html`` (through a temporary file and a rename) and return its
    path. A results set draws it as its ``finish`` (:func:`tlpersona.infra.resultsets.results_set`),
    before the set is marked finished, so that the page is one of the set's files."""
    folder = Path(folder)
    page = render_html(folder)
    path = folder / HTML_NAME
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
