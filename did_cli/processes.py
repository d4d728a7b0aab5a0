"""Work split across the processes `accelerate launch` or `torchrun` start: the one place that reads the launcher.

Sample `i` depends only on `(seed, i)`, so processes can split work with no communication while they compute:
process `r` of `W` takes the items at positions `p` with `p % W == r` (sample ids for `draft` and `generate`, input
records for `refine`, samples for `eval-ppl`, rows for `eval-nll`) and the results are put back in position order.
`current_processes()` reads `WORLD_SIZE` once and, when several processes were launched, forms the process group
through accelerate's `PartialState` (gloo on CPUs, NCCL on GPUs); every API function that can split its work takes
the resulting `Processes` value, so a Python caller gets what the CLI gets. Nothing here launches anything.

Training needs accelerate's full `Accelerator` (DDP, mixed precision); `accelerator()` builds it with the same
CPU rule, so `did finetune` reads the launch the same way.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from did_cli import errors
from did_cli.errors import DidError, UsageError

__all__ = ["ONE_PROCESS", "Processes", "Shard", "accelerator", "current_processes", "interleave", "launch"]


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: positions `p` with `p % world == rank`."""

    rank: int = 0
    world: int = 1

    def owns(self, position: int) -> bool:
        """Whether this process handles the item at `position`."""
        return position % self.world == self.rank

    @property
    def is_main(self) -> bool:
        """The process that merges results, writes shared files and reports progress."""
        return self.rank == 0


def _gather_one(items: list[Any]) -> list[list[Any]]:
    return [items]


def _same(value: Any) -> Any:
    return value


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Processes:
    """The processes sharing a command's work: this one's shard, its device and the collectives the commands use.

    `gather(items)` returns every process's list in rank order; `broadcast(value)` returns the main process's value
    on every process; `barrier()` waits for every process. With one process all three are trivial, so the same code
    runs either way.

    Attributes:
        shard: which positions this process handles.
        device: this process's accelerator (`cuda:LOCAL_RANK`) when a launcher started several, else None.
    """

    shard: Shard = field(default_factory=Shard)
    device: str | None = None
    gather: Callable[[list[Any]], list[list[Any]]] = _gather_one
    broadcast: Callable[[Any], Any] = _same
    barrier: Callable[[], None] = _nothing

    @property
    def world(self) -> int:
        """How many processes share the work."""
        return self.shard.world

    @property
    def is_main(self) -> bool:
        """Whether this is the main process (rank 0)."""
        return self.shard.is_main

    def owns(self, position: int) -> bool:
        """Whether this process handles the item at `position`."""
        return self.shard.owns(position)

    def mine(self, items: list[Any]) -> list[Any]:
        """The items at the positions this process owns, in order."""
        return items if self.world == 1 else [item for p, item in enumerate(items) if self.owns(p)]

    def all_of(self, mine: list[Any]) -> list[Any]:
        """Everyone's items in position order, from this process's share (see `interleave`)."""
        return mine if self.world == 1 else interleave(self.gather(mine))

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """`compute()` on the main process (reading files, say), its result on every process."""
        value = compute() if self.is_main else None
        return value if self.world == 1 else self.broadcast(value)

    def first(self, values: list[Any]) -> Any:
        """The first non-None of every process's value, in rank order: one answer all processes agree on."""
        everyone = [values] if self.world == 1 else self.gather(values)
        return next((value for part in everyone for value in part if value is not None), None)

    def agree(self, problem: DidError | None) -> None:
        """Raise the first problem any process found, on every process: no process goes on while another stops.

        A check that fails on one process only (its share of a resumed file, say) would otherwise leave the others
        waiting at the next collective forever.
        """
        found = self.first([None if problem is None else (type(problem).__name__, str(problem))])
        if found is None:
            return
        kind, message = found
        if problem is not None and str(problem) == message:
            raise problem
        error = getattr(errors, kind, DidError)
        raise (error if isinstance(error, type) and issubclass(error, DidError) else DidError)(message)

    def device_for(self, requested: str) -> str:
        """Each launched process takes its own accelerator (`cuda:LOCAL_RANK`) unless told a specific one."""
        if self.device is not None and requested in ("auto", "cuda"):
            return self.device
        return requested


ONE_PROCESS = Processes()


def launch() -> Shard:
    """This process's rank and the process count, as the launcher's environment says (before any group forms).

    `WORLD_SIZE` and `RANK` are what `torchrun` and `accelerate launch` set; run directly, this is `Shard(0, 1)`.
    """
    try:
        world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise UsageError(
            "WORLD_SIZE and RANK must be integers (they are set by torchrun or accelerate launch)"
        ) from None
    return Shard(rank, world)


def current_processes() -> Processes:
    """The Processes of this launch, with accelerate's object collectives when several processes run.

    The process group is formed once (gloo when no GPU is visible, as `did finetune` does) and gives each process its
    own device.
    """
    if launch().world == 1:
        return ONE_PROCESS
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    state = PartialState(cpu=not torch.cuda.is_available())
    _shut_down_at_exit(state)

    def gather(items: list[Any]) -> list[list[Any]]:
        return gather_object([items])

    def broadcast(value: Any) -> Any:
        return broadcast_object_list([value])[0]

    shard = Shard(state.process_index, state.num_processes)
    return Processes(shard, str(state.device), gather, broadcast, state.wait_for_everyone)


_SHUT_DOWN: list[Any] = []


def _shut_down_at_exit(state: Any) -> None:
    """Destroy the process group when the interpreter exits, before it tears its threads down.

    Without this, gloo's worker threads can outlive the objects they use at interpreter shutdown, and a process
    whose output was complete and correct sometimes ends with `terminate called without an active exception`
    (SIGABRT, so torchrun reports a failure). By then every collective has returned.
    """
    if _SHUT_DOWN:
        return
    _SHUT_DOWN.append(state)

    def shut_down() -> None:
        with contextlib.suppress(Exception):
            state.destroy_process_group()

    atexit.register(shut_down)


def accelerator(**kwargs: Any) -> Any:
    """The `accelerate.Accelerator` of this launch (training).

    Without a GPU, accelerate only forms a multi-process (gloo) group when told to run on the CPU; doing so whenever
    several processes were launched makes `accelerate launch --multi_gpu` and torchrun work on CPUs too.
    """
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=launch().world > 1 and not torch.cuda.is_available(), **kwargs)


def interleave(parts: list[list[Any]]) -> list[Any]:
    """Undo the round-robin split: item `p` is element `p // W` of part `p % W`.

    Raises:
        UsageError: the parts cannot come from one round-robin split (a part is missing items).
    """
    world, total = len(parts), sum(len(part) for part in parts)
    for rank, part in enumerate(parts):
        expected = len(range(rank, total, world))
        if len(part) != expected:
            raise UsageError(f"part {rank} of {world} holds {len(part)} items, not {expected}; rerun with --resume")
    return [parts[p % world][p // world] for p in range(total)]
