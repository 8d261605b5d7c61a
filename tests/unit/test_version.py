"""One code version, recorded by every file a run writes."""

import json
from importlib.metadata import version

from factories import write_synthetic

import tlpersona
from tlpersona.api.analysis import compare, subspace
from tlpersona.version import __version__


def test_package_metadata_reads_the_one_version():
    assert tlpersona.__version__ == __version__ == version("tlpersona")


def test_store_and_results_record_the_code_version(tmp_path):
    st = write_synthetic(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["code_version"] == __version__
    compare(st, permutations=200, null_draws=5).save(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "results.json").read_text())["code_version"] == __version__
    subspace(st, null_draws=5).save(tmp_path / "u")
    assert json.loads((tmp_path / "u" / "subspace.json").read_text())["code_version"] == __version__
