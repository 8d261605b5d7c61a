"""Several processes (``torchrun``) sharing one run: personas and responses split by rank.

Work is split by fixed groups (persona groups for extraction, batches for generation), so every
item is computed exactly as a single process would compute it; each rank writes its own files,
every rank stacks its share of the store's position files at the end, and rank 0 writes the
manifest. Single-process runs see world size 1 and skip every collective.

A check that only rank 0 makes (the lock on ``out``, the state of the store) runs through
:meth:`Ranks.agree`: its refusal reaches every rank, so each prints the same one line and exits
2, instead of the others failing in a collective that rank 0 left.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from tlpersona.errors import TlpersonaError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[T] = [obj] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def agree(self, check: Callable[[], T]) -> T:
        """Run ``check`` here, then wait for every rank's: a :class:`TlpersonaError` on any
        rank is raised on every rank (the lowest rank's message), so all stop together. Also
        a barrier."""
        if self.world == 1:
            return check()
        error: str | None = None
        try:
            result = check()
        except TlpersonaError as exc:
            error = str(exc)
        errors: list[str | None] = self.gather(error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise TlpersonaError(first) from None
        return result

    def main_first(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, then on every other rank (rank 0 creates what the others then
        open and check); a refusal on any rank stops every rank (:meth:`agree`)."""
        if self.main:
            made = self.agree(make)
            self.agree(lambda: None)
            return made
        self.agree(lambda: None)
        return self.agree(make)

    def device(self) -> str:
        """This rank's default device: its own GPU under torchrun, else cuda or cpu."""
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}" if self.world > 1 else "cuda"
        return "cpu"


def ranks() -> Ranks:
    """The current process's place in a torchrun launch; joins the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    r = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(r.local_rank)
        # Ranks wait for each other only at the end of a phase, which can be hours away.
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=12),
            device_id=torch.device("cuda", r.local_rank) if cuda else None)
    return r
