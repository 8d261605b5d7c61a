"""Locks (issue 12, item 7): a second run on a locked ``--out`` stops at once naming the holder's
PID, the model cache and a saved analysis wait for their holder instead, and within one process a
lock is re-entrant in its thread and excludes other threads. The holders are other processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import SMALL, small_store
from factories import copy_store as _copy
from factories import fails as _fails
from factories import snapshot as _snapshot

from tlpersona.errors import TlpersonaError


@pytest.fixture(scope="module")
def store(loaded, tmp_path_factory) -> Path:
    return small_store(loaded, tmp_path_factory.mktemp("locks") / "store")


_HOLD = ("import sys, time; from tlpersona.infra.locks import exclusive\n"
         "with exclusive(sys.argv[1], 'x'):\n    print('held', flush=True); time.sleep(float(sys.argv[2]))")


def _holder(directory: Path, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory), str(seconds)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_locked_out_stops_a_second_run_naming_the_holder(store, tmp_path):
    s = _copy(store, tmp_path)
    proc = _holder(s, 60)
    try:
        before = _snapshot(s)
        _fails(f"is in use by PID {proc.pid}", "extract", *SMALL, "--out", str(s), "--force-new",
               "--positions", "last", "--layers", "3")
        assert {k: v for k, v in _snapshot(s).items() if k != "tlpersona.lock"} == \
            {k: v for k, v in before.items() if k != "tlpersona.lock"}
    finally:
        proc.kill()
        proc.wait()
    gen = tmp_path / "gen"  # generate's lock is its --out's directory (never a store's: refused)
    gen.mkdir()
    proc = _holder(gen, 60)
    try:
        _fails(f"in use by PID {proc.pid}", "generate", *SMALL, "--out", str(gen / "r.jsonl"))
        assert not (gen / "r.jsonl").exists()
    finally:
        proc.kill()
        proc.wait()


def test_the_model_cache_lock_waits_for_its_holder(tmp_path):
    from tlpersona.infra.locks import exclusive

    proc = _holder(tmp_path, 1.5)
    t0 = time.perf_counter()
    with exclusive(tmp_path, "the model cache", wait=True):
        waited = time.perf_counter() - t0
    proc.wait()
    assert waited > 0.5


def test_a_lock_is_re_entrant_in_its_thread_and_excludes_other_threads(tmp_path):
    import threading

    from tlpersona.infra.locks import exclusive

    held, release = threading.Event(), threading.Event()

    def hold():
        with exclusive(tmp_path / "d", "x"), exclusive(tmp_path / "d", "x", wait=True):
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(30)
        with pytest.raises(TlpersonaError, match="is in use by"), exclusive(tmp_path / "d", "x"):
            pass
    finally:
        release.set()
        t.join()
    with exclusive(tmp_path / "d", "x"):
        pass


def test_a_waiter_takes_the_lock_when_its_fresh_holder_fails_and_cleans_up(tmp_path):
    """A failed first holder removes the lock file and directory it made; a run waiting on it
    then holds the lock (re-made), and a third is refused: never two holders."""
    import threading

    from tlpersona.infra.locks import exclusive

    d = tmp_path / "d"
    holding, release = threading.Event(), threading.Event()

    def first():
        with pytest.raises(RuntimeError), exclusive(d, "x"):
            time.sleep(1.0)
            raise RuntimeError("failed")

    def waiter():
        time.sleep(0.3)
        with exclusive(d, "x", wait=True):
            holding.set()
            release.wait(30)

    threads = [threading.Thread(target=first), threading.Thread(target=waiter)]
    for t in threads:
        t.start()
    try:
        assert holding.wait(30) and (d / "tlpersona.lock").exists()
        with pytest.raises(TlpersonaError, match="is in use by"), exclusive(d, "x"):
            pass
    finally:
        release.set()
        for t in threads:
            t.join()


def test_an_analysis_into_a_locked_out_stops_at_once(store, tmp_path):
    out = tmp_path / "cmp"
    proc = _holder(out, 60)
    try:
        t0 = time.perf_counter()
        _fails(f"--out {out} is in use by PID {proc.pid}", "steer", str(store), "--out", str(out))
        assert time.perf_counter() - t0 < 60
        assert sorted(p.name for p in out.iterdir()) == ["tlpersona.lock"]
    finally:
        proc.kill()
        proc.wait()


def test_saving_an_analysis_waits_for_a_run_holding_its_out(store, tmp_path):
    import tlpersona as tlp

    result = tlp.project(store)
    out = tmp_path / "proj"
    proc = _holder(out, 1.5)
    t0 = time.perf_counter()
    result.save(out)
    waited = time.perf_counter() - t0
    proc.wait()
    assert waited > 0.5 and json.loads((out / "projection.json").read_text())["layer"] == 29
