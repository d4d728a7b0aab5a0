"""Sampling across processes started by `accelerate launch` or `torchrun`: who draws what, and one output file.

Sample `i` depends only on `(seed, i)`, so processes can split the work with no communication while they sample:
process `r` of `W` takes the samples at positions `p` with `p % W == r` (sample ids for `draft` and `generate`, input
records for `refine`) and writes them to its own part file beside `--out`. When every process has finished
(accelerate's `wait_for_everyone`), the main process interleaves the parts back into position order and writes
`--out` atomically, so the file equals a one-process run's. Process groups are formed by accelerate's
`PartialState` (gloo on CPUs, NCCL on GPUs) from the environment the launcher sets; nothing here launches anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from did_cli.errors import UsageError


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: positions `p` with `p % world == rank`."""

    rank: int = 0
    world: int = 1

    def owns(self, position: int) -> bool:
        """Whether this process draws the sample at `position`."""
        return position % self.world == self.rank

    @property
    def is_main(self) -> bool:
        """The process that merges the parts and reports progress."""
        return self.rank == 0


ONE_PROCESS = Shard()


def launched_world() -> int:
    """How many processes the launcher started (`WORLD_SIZE`; 1 when run directly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def current_shard() -> tuple[Shard, Any]:
    """This process's Shard and accelerate's PartialState (None for a single process).

    The state forms the process group (gloo when no GPU is visible, as `did finetune` does) and gives each process
    its own device.
    """
    world = launched_world()
    if world == 1:
        return Shard(), None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Shard(state.process_index, state.num_processes), state


@dataclass(frozen=True)
class Processes:
    """What a command needs to split work across processes: its shard and the two collectives it uses.

    `gather(items)` returns every process's list in rank order; `broadcast(value)` returns the main process's value
    on every process. With one process both are trivial, so the same code runs either way.
    """

    shard: Shard = ONE_PROCESS
    device: str | None = None  # this process's accelerator when a launcher started several
    gather: Callable[[list[Any]], list[list[Any]]] = lambda items: [items]  # noqa: E731 - a trivial default
    broadcast: Callable[[Any], Any] = lambda value: value  # noqa: E731

    def all_of(self, mine: list[Any]) -> list[Any]:
        """Everyone's items in position order, from this process's share (see `interleave`)."""
        return mine if self.shard.world == 1 else interleave(self.gather(mine))

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """`compute()` on the main process (reading files, say), its result on every process."""
        value = compute() if self.shard.is_main else None
        return value if self.shard.world == 1 else self.broadcast(value)


def current_processes() -> Processes:
    """The Processes of this launch, with accelerate's object collectives when several processes run."""
    shard, state = current_shard()
    if state is None:
        return Processes()
    from accelerate.utils import broadcast_object_list, gather_object

    def gather(items: list[Any]) -> list[list[Any]]:
        return gather_object([items])

    def broadcast(value: Any) -> Any:
        return broadcast_object_list([value])[0]

    return Processes(shard, str(state.device), gather, broadcast)


def part_path(out: Path, shard: Shard) -> Path:
    """Where process `shard.rank` writes its records while the run goes on (beside `out`)."""
    return out.with_name(f"{out.name}.part{shard.rank}-of-{shard.world}")


def part_paths(out: Path, world: int) -> list[Path]:
    """Every process's part file, in rank order."""
    return [part_path(out, Shard(rank, world)) for rank in range(world)]


def interleave(parts: list[list[Any]]) -> list[Any]:
    """Undo the round-robin split: item `p` is element `p // W` of part `p % W`.

    Raises:
        UsageError: the parts cannot come from one round-robin split (a part is missing records).
    """
    world, total = len(parts), sum(len(part) for part in parts)
    for rank, part in enumerate(parts):
        expected = len(range(rank, total, world))
        if len(part) != expected:
            raise UsageError(f"part {rank} of {world} holds {len(part)} records, not {expected}; rerun with --resume")
    return [parts[p % world][p // world] for p in range(total)]
