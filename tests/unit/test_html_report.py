"""report.html: one offline page of an analysis folder (tlpersona.report.html). The unit tests
read the HTML it writes; the browser test opens it from file:// in Debian's Chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from tlpersona.errors import TlpersonaError
from tlpersona.report.html import write_html

MANIFEST = "509955ff9a63655d69acb2e369e1891eb991b390c1338770885993612bb4e689"
VERSION = "9.8.7"
HEADLINE = "Recipes agree at L3 beyond chance; no shared subspace."
#: the summary's table: recipe -> r (one row without a number)
ROWS = [("last", "0.5 (0.1)"), ("sys_end", "10"), ("prompt_mean", "-2.25"),
        ("response_mean", "n/a"), ("first", "1e-3")]


def _png(path: Path, width_in: float) -> None:
    fig = Figure(figsize=(width_in, 2))
    ax = fig.subplots()
    ax.plot([0, 1, 2], [2, 0, 1])
    ax.set_title(path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=50, format="png")


def _png_width(path: Path) -> int:
    """A PNG's width from its IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int(struct.unpack(">I", data[16:20])[0])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An analysis folder as the experiment writes one: report.md (headline, a table, a figure,
    links), details.md, a section file, three figures (one named nowhere), result JSON."""
    out = tmp_path / "compare"
    for name, width in (("verdicts", 6), ("matrix_r_L3", 4), ("extra [1] <b>%20", 3)):
        _png(out / "figures" / f"{name}.png", width)
    table = "\n".join(f"| {r} | {v} |" for r, v in ROWS)
    (out / "report.md").write_text(
        "# Persona experiment: <b>default</b>\n\n"
        f"**{HEADLINE}**\n\n"
        f"| recipe | r |\n|---|---:|\n{table}\n\n"
        "![verdicts](figures/verdicts.png)\n\n"
        "Every table: [details.md](details.md); the subspace: [subspace.md](subspace.md); "
        "cells: [cells.csv](cells.csv).\n\n"
        "Persona prompt quoted: <script>alert(1)</script> and `<img src=x onerror=alert(2)>`; "
        "see <https://example.com/a> or [the docs](http://example.com/b), "
        "![remote](https://example.com/c.png).\n")
    (out / "details.md").write_text(
        "# Details\n\nDETAILS-BODY-TEXT\n\n## Shared persona subspace\n\n"
        "| layer | k |\n|---|---|\n| 3 | 2 |\n| 15 | 0 |\n\n"
        "![matrix r](figures/matrix_r_L3.png)\n\n![verdicts again](figures/verdicts.png)\n")
    (out / "subspace.md").write_text("## Shared persona subspace\n\nits section\n")
    (out / "cells.csv").write_text("a,b\n1,2\n")
    (out / "results.json").write_text(json.dumps(
        {"input": {"manifest_hash": MANIFEST}, "code_version": VERSION}))
    (out / "steering.json").write_text(json.dumps(
        {"inputs": {"store_manifest_hash": MANIFEST}, "store_manifest_hash": MANIFEST,
         "code_version": VERSION}))
    return out


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of <script>, <style> and <footer>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {"script": "", "style": "", "footer": ""}
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop() != tag:
            pass

    def handle_data(self, data: str) -> None:
        for tag in self.text:
            if tag in self._open:
                self.text[tag] += data


def _parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    return p


def test_the_page_opens_with_the_summary_and_embeds_every_figure(folder: Path):
    path = write_html(folder)
    assert path == folder / "report.html"
    page = path.read_text()
    body = page[page.index("<body>"):]
    # the summary first: headline before the details, the details before the footer
    assert body.index(HEADLINE) < body.index("DETAILS-BODY-TEXT") < body.index("<footer>")
    assert body.index('id="summary"') < body.index('id="details"')
    imgs = [a for t, a in _parse(page).tags if t == "img"]
    embedded: list[bytes] = []
    for a in imgs:
        head, _, data = a["src"].partition(",")
        assert head == "data:image/png;base64", a["src"][:40]
        embedded.append(base64.b64decode(data))
    # verdicts (report and details), matrix r, and the figure no markdown names
    figs = {p.name: p.read_bytes() for p in (folder / "figures").iterdir()}
    assert sorted(embedded) == sorted([figs["verdicts.png"], figs["verdicts.png"],
                                       figs["matrix_r_L3.png"], figs["extra [1] <b>%20.png"]])
    assert [a["alt"] for a in imgs] == ["verdicts", "matrix r", "verdicts again",
                                        "extra [1] <b>%20.png"]
    assert "[figure missing: https://example.com/c.png]" in page
    assert not list(folder.glob(".report.html.*"))  # the temporary file is gone


def test_the_page_references_no_network_and_its_policy_admits_its_own_code(folder: Path):
    page = write_html(folder).read_text()
    parsed = _parse(page)
    refs = [(t, k, v) for t, a in parsed.tags for k, v in a.items() if k in ("src", "href")]
    assert refs, "no references at all"
    for tag, key, value in refs:
        assert not re.match(r"^\s*([a-z][a-z0-9+.-]*:|//)", value, re.I) or value.startswith("data:"), \
            (tag, key, value[:60])
    assert "https://example.com/a" in page  # the link's text stays, as text
    hrefs = [a["href"] for t, a in parsed.tags if t == "a"]
    # links to files on the page, or to a file whose heading is on it, become anchors
    assert hrefs == ["#details", "#shared-persona-subspace", "cells.csv"]
    assert any(a.get("id") == "shared-persona-subspace" for _, a in parsed.tags)
    csp = next(a["content"] for t, a in parsed.tags
               if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "img-src data:" in csp

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    # the browser runs the script and applies the style only if their hashes are these
    assert f"script-src {sha(parsed.text['script'])}" in csp
    assert f"style-src {sha(parsed.text['style'])}" in csp


def test_user_text_stays_text(folder: Path):
    page = write_html(folder).read_text()
    assert "<script>alert" not in page and "<b>default" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    parsed = _parse(page)
    assert not any(t == "img" and a.get("src") == "x" for t, a in parsed.tags)
    assert [t for t, _ in parsed.tags].count("script") == 1  # the page's own
    assert "<title>Persona experiment: &lt;b&gt;default&lt;/b&gt;</title>" in page


def test_the_footer_names_the_store_manifest_and_the_code_version(folder: Path):
    footer = _parse(write_html(folder).read_text()).text["footer"]
    assert MANIFEST in footer and VERSION in footer
    assert "results.json, steering.json" in footer
    # files of two runs: each value is named with its files
    (folder / "patch.json").write_text(json.dumps(
        {"patching": {"inputs": {"store_manifest_hash": "f" * 64}}, "code_version": "0.1.0"}))
    (folder / "subspace.json").write_text("{not json")
    footer = _parse(write_html(folder).read_text()).text["footer"]
    assert f"{MANIFEST} (results.json, steering.json)" in footer
    assert f"{'f' * 64} (patch.json)" in footer and "0.1.0 (patch.json)" in footer
    assert "unreadable: subspace.json" in footer


def test_every_table_is_sortable(folder: Path):
    parsed = _parse(write_html(folder).read_text())
    tables = [a for t, a in parsed.tags if t == "table"]
    assert len(tables) == 2 and all(a.get("class") == "sortable" for a in tables)
    # the right-aligned column keeps its alignment without an inline style (the policy)
    assert not any("style" in a for _, a in parsed.tags)
    assert any(t == "th" and a.get("class") == "align-right" for t, a in parsed.tags)
    assert "sortBy" in parsed.text["script"] and "table.sortable" in parsed.text["script"]


def test_a_single_analysis_folder_opens_with_its_own_markdown(tmp_path: Path):
    out = tmp_path / "steer"
    _png(out / "figures" / "steering_effects.png", 4)
    (out / "steering.md").write_text("## Steering\n\nno recipe steers beyond random\n\n"
                                     "![steering effects](figures/steering_effects.png)\n"
                                     "![gone](figures/steering_curves.png)\n"
                                     "![outside](../outside.png)\n")
    _png(tmp_path / "outside.png", 2)  # an image file, but not the folder's
    (out / "steering.json").write_text(json.dumps({"store_manifest_hash": MANIFEST}))
    page = write_html(out).read_text()
    assert "no recipe steers beyond random" in page and 'id="details"' not in page
    assert page.count("data:image/png;base64,") == 1
    assert "[figure missing: figures/steering_curves.png]" in page
    assert "[figure missing: ../outside.png]" in page
    assert MANIFEST in page and "code version: not recorded" in page


def test_bad_folders_are_one_line_and_leave_an_earlier_page(folder: Path, tmp_path: Path):
    with pytest.raises(TlpersonaError, match="holds no report to render"):
        write_html(folder / "figures")
    with pytest.raises(TlpersonaError, match="is not a directory"):
        write_html(tmp_path / "nowhere")
    before = write_html(folder).read_bytes()
    (folder / "details.md").write_bytes(b"# Details \xff\xfe\n")
    with pytest.raises(TlpersonaError, match="details.md is not UTF-8"):
        write_html(folder)
    assert (folder / "report.html").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []



def test_a_page_written_into_a_finished_set_is_named_by_overwrite(folder: Path, tmp_path: Path):
    from tlpersona.api.results import results_set
    from tlpersona.infra.paths import check_results_dir

    out = tmp_path / "set"
    with results_set(out, "compare", overwrite=False) as stage:
        for p in folder.iterdir():
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, stage / p.name)
    check_results_dir(out, overwrite=True)  # the set alone may be replaced
    write_html(out)
    with pytest.raises(TlpersonaError, match="holds report.html, which is not part of the results"):
        check_results_dir(out, overwrite=True)
    # written inside the set, the page is one of its files
    (out / "report.html").unlink()
    with results_set(out, "compare", overwrite=True) as stage:
        for p in folder.iterdir():
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, stage / p.name)
        write_html(stage)
    assert (out / "report.html").is_file()
    check_results_dir(out, overwrite=True)

# --- in a real browser -------------------------------------------------------------------------

def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None,
                    reason="Chromium and ChromeDriver are not installed "
                           "(Debian: apt-get install chromium chromium-driver)")
def test_the_page_in_headless_chromium(folder: Path, tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    found = _chromium()
    assert found is not None
    browser, driver_path = found
    page = write_html(folder)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1400", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(page.as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        summary = driver.find_element(By.ID, "summary")
        assert summary.is_displayed() and HEADLINE in summary.text
        sections = driver.find_elements(By.CSS_SELECTOR, "main > section")
        assert [s.get_attribute("id") for s in sections] == ["summary", "details", "figures"]
        assert summary.location["y"] < sections[1].location["y"]
        widths = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        expect = {"verdicts": "verdicts", "matrix r": "matrix_r_L3", "verdicts again": "verdicts",
                  "extra [1] <b>%20.png": "extra [1] <b>%20"}
        assert [w[0] for w in widths] == list(expect)
        for alt, complete, width in widths:
            assert complete and width == _png_width(folder / "figures" / f"{expect[alt]}.png"), alt

        table = driver.find_elements(By.CSS_SELECTOR, "table.sortable")[0]
        headers = table.find_elements(By.CSS_SELECTOR, "thead th")

        def column(i: int) -> list[str]:
            return [r.find_elements(By.TAG_NAME, "td")[i].text
                    for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

        assert column(0) == [r for r, _ in ROWS]
        # the number each cell starts with, independently of the page's script; n/a last
        value = {v: float(v.split()[0]) for _, v in ROWS if v != "n/a"}
        numbers = sorted(value, key=value.__getitem__)
        headers[1].click()
        assert column(1) == [*numbers, "n/a"]
        assert headers[1].get_attribute("aria-sort") == "ascending"
        headers[1].click()
        assert column(1) == [*reversed(numbers), "n/a"]
        assert headers[1].get_attribute("aria-sort") == "descending"
        headers[0].click()
        assert column(0) == sorted(r for r, _ in ROWS)
        assert headers[1].get_attribute("aria-sort") is None

        shot = tmp_path / "report-html.png"
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(str(shot)) and _png_width(shot) > 0
        print(f"screenshot: {shot}")
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []  # no script error, no refused resource, no failed load
    finally:
        driver.quit()
