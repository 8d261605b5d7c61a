"""Finalising a store under torchrun: every rank stacks its share of the position files, rank 0
writes the manifest, and the result equals a single process's store (two ranks simulated by two
threads that meet in ``gather``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tlpersona.cache import StoreWriter, open_store
from tlpersona.cache.schema import PARTS
from tlpersona.cache.writer import StoreWriter as _Writer
from tlpersona.runtime.distributed import Ranks

POSITIONS = ["last", "prompt_mean", "sys_end", "sys_end+1", "response_mean"]
PROV = {"personas": ["a", "b", "c"], "questions": ["q0", "q1"], "layers": [1, 3],
        "positions": POSITIONS, "prompt_index": 0}


def _parts(root: Path) -> StoreWriter:
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(root, PROV, {"d_model": 4})
    for i in range(3):
        t = {}
        for pos in POSITIONS:
            t[f"{pos}/centroid"] = torch.randn(2, 4, generator=g)
            t[f"{pos}/per_question"] = torch.randn(2, 2, 4, generator=g).half()
            t[f"{pos}/valid"] = torch.ones(2, dtype=torch.uint8)
        w.write_part(i, t)
    return w


@dataclass
class _Meeting:
    """Where the simulated ranks exchange their gathered objects."""

    barrier: threading.Barrier = field(default_factory=lambda: threading.Barrier(2))
    slots: list = field(default_factory=lambda: [None, None])


@dataclass(frozen=True)
class ThreadRank(Ranks):
    meeting: _Meeting = field(default_factory=_Meeting)

    def gather(self, obj):
        self.meeting.slots[self.rank] = obj
        self.meeting.barrier.wait()
        return list(self.meeting.slots)


def test_two_ranks_split_the_stacking_and_equal_one_process(tmp_path, monkeypatch):
    single = _parts(tmp_path / "single")
    single.finalize()
    multi = tmp_path / "multi"
    writers = [_parts(multi), StoreWriter(multi, PROV, {"d_model": 4})]
    stacked: dict[int, list[str]] = {0: [], 1: []}
    original = _Writer._stack

    def spy(self, pos, parts, n):
        stacked[next(r for r, w in enumerate(writers) if w is self)].append(pos)
        return original(self, pos, parts, n)

    monkeypatch.setattr(_Writer, "_stack", spy)
    meeting = _Meeting()
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            writers[rank].finalize(ThreadRank(rank, 2, rank, meeting))
        except BaseException as err:  # surfaced below
            errors.append(err)
            meeting.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(stacked[0] + stacked[1]) == sorted(POSITIONS)
    assert stacked[1] and set(stacked[1]) == set(POSITIONS[1::2])
    a, b = open_store(tmp_path / "single"), open_store(multi)
    assert list(a.manifest["files"]) == list(b.manifest["files"])
    for pos in POSITIONS:
        assert torch.equal(a.centroids(pos), b.centroids(pos))
        assert torch.equal(a.per_question(pos), b.per_question(pos))
        assert a.manifest["files"] == b.manifest["files"]  # same bytes, same hashes
    assert not (multi / PARTS).exists()
