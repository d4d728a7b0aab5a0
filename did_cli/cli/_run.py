"""Plumbing shared by the sampling commands: loading, progress on stderr, the output file, streaming records out.

stdout carries records only. Progress goes to stderr: a rich bar when stderr is a terminal (told never to take over
stdout, which rich's live displays otherwise do), plain rate-limited lines when it is not (logs, batch jobs), and a
closing summary in both cases unless `--quiet`. Heavy modules (torch, the model code) are imported inside the
functions so `did --help` and option errors answer at once.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from did_cli.config import UnmaskingSettings
from did_cli.distributed import Shard, current_shard, interleave, launched_world, part_path, part_paths
from did_cli.errors import DidError, UsageError
from did_cli.records import PARTIAL_SUFFIX, Record, RecordWriter, read_complete_records

if TYPE_CHECKING:
    from did_cli.api import Progress as ProgressEvent
    from did_cli.model import BD3LM

stderr = Console(stderr=True, highlight=False)

# Seconds between plain progress lines when stderr is not a terminal; DID_PROGRESS_SECONDS overrides it.
_PLAIN_INTERVAL = 10.0


def say(message: str) -> None:
    """One plain line on stderr (markup in `message` is printed literally)."""
    stderr.print(escape(message), soft_wrap=True)


@dataclass(frozen=True)
class Execution:
    """How the model runs, from the speed and cache-numerics flags (none changes float32 samples)."""

    attn_backend: str = "auto"
    compile: bool = False
    cuda_graphs: bool = False
    kv_cache_dtype: str | None = None


def load(
    model: str,
    tokenizer: str | None,
    revision: str | None,
    device: str,
    dtype: str,
    execution: Execution = Execution(),  # noqa: B008 - frozen, so one shared default is safe
) -> tuple[BD3LM, Any]:
    """The model and its tokenizer, checked against each other, set to execute as `execution` asks."""
    from did_cli.attention import check_attn_backend
    from did_cli.checkpoints import load_model, load_tokenizer
    from did_cli.compile import optimize

    check_attn_backend(execution.attn_backend)
    loaded = load_model(model, device=device, dtype=dtype, revision=revision, kv_cache_dtype=execution.kv_cache_dtype)
    optimize(loaded, attn_backend=execution.attn_backend, compile=execution.compile, cuda_graphs=execution.cuda_graphs)
    return loaded, load_tokenizer(loaded, tokenizer)


def check_kv_cache_flags(kv_cache_dtype: str | None, no_kv_cache: bool) -> None:
    """Refuse a cache dtype that would not act: with --no-kv-cache no cache is made."""
    if no_kv_cache and kv_cache_dtype is not None:
        raise UsageError(f"--kv-cache-dtype {kv_cache_dtype} has no effect with --no-kv-cache; drop one of them")


def unmasking(
    order: str | None,
    steps_per_block: int | None,
    tokens_per_call: int,
    top_p: float,
    temperature: float,
    confidence_threshold: float | None = None,
) -> UnmaskingSettings:
    """UnmaskingSettings from CLI flags; `--steps-per-block` alone implies `--order steps`.

    `--confidence-threshold` alone implies `--order confidence`.

    A flag that the chosen order would ignore is refused rather than silently dropped or silently changing the order.
    """
    if order is None and confidence_threshold is not None and steps_per_block is None:
        order = "confidence"
    if order is None:
        order = "steps" if steps_per_block is not None else "first-hitting"
    if steps_per_block is not None and order != "steps":
        raise UsageError(f"--steps-per-block only applies to --order steps, not --order {order}")
    if order == "steps" and tokens_per_call != 1:
        raise UsageError("--tokens-per-call does not apply to --order steps (--steps-per-block sets the calls)")
    return UnmaskingSettings(order, steps_per_block, tokens_per_call, top_p, temperature, confidence_threshold)


def _plain_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("DID_PROGRESS_SECONDS", _PLAIN_INTERVAL)))
    except ValueError:
        return _PLAIN_INTERVAL


class PlainLines:
    """Progress for logs and batch jobs (stderr not a terminal): one plain line on stderr every so often.

    The interval is 10 s (`DID_PROGRESS_SECONDS` overrides it), the first line comes after one interval (a command that
    fails at once prints only its error), and `force` prints regardless.
    """

    def __init__(self) -> None:
        self._interval = _plain_interval()
        self.started = self._last = time.perf_counter()

    def __call__(self, message: str, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        say(f"{message}, {now - self.started:.0f}s elapsed")


class Reporter:
    """Progress and the closing summary on stderr (see the module docstring); silent with `quiet`."""

    def __init__(self, quiet: bool, total: int | None, others: Callable[[], int] | None = None) -> None:
        self.quiet = quiet
        self._others = others  # samples finished by other processes (one bar counts every process)
        self._others_done, self._others_read = 0, 0.0
        self.live = not quiet and stderr.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None
        self._total = total
        self._lines = PlainLines()
        self.started = self._lines.started

    def __enter__(self) -> Reporter:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("samples"),
                TextColumn("{task.fields[tokens]}"),
                TimeElapsedColumn(),
                console=stderr,
                transient=True,
                # rich's default swaps sys.stdout for a proxy that prints above the bar, on stderr: records would
                # land on the screen instead of in the pipe or file stdout points at.
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("sampling", total=self._total, tokens="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.quiet:
            return
        total = event.samples_total or self._total
        done = event.samples_done + self._count_others()
        if self._progress is not None:
            tokens = f"batch tokens {event.tokens_done}/{event.tokens_total}" if event.tokens_total else ""
            self._progress.update(self._task, completed=done, description=event.stage, tokens=tokens, total=total)
            return
        of_total = f"/{total}" if total else ""
        self._lines(f"{event.stage}: {done}{of_total} samples finished")

    def _count_others(self) -> int:
        now = time.perf_counter()
        if self._others is not None and now - self._others_read > 1.0:  # reads files: at most once a second
            self._others_done, self._others_read = self._others(), now
        return self._others_done

    def summary(self, records: int, generated: int, nfes: int, extra: str = "") -> None:
        """One line on stderr: samples, generated tokens, tokens/s (generated only), NFEs."""
        if self.quiet:
            return
        seconds = time.perf_counter() - self.started
        samples = "1 sample" if records == 1 else f"{records} samples"
        say(
            f"{samples}, {generated} tokens generated by this command's stages in {seconds:.1f}s "
            f"({generated / max(seconds, 1e-9):.1f} tokens/s), {nfes} NFEs{extra}"
        )


@dataclass
class Run:
    """Where this process's records go, and its share of the work when several processes were launched.

    Attributes:
        writer: this process's RecordWriter (`--out`, stdout, or its part file beside `--out`).
        shard: which positions this process draws (`Shard()` alone).
        state: accelerate's PartialState with several processes, else None.
        out: the final output file (None for stdout).
    """

    writer: RecordWriter
    shard: Shard
    state: Any
    out: Path | None
    reporter: Reporter | None = None
    new_stages: int = 1

    def device(self, requested: str) -> str:
        """Each launched process takes its own accelerator (`cuda:LOCAL_RANK`) unless told otherwise."""
        if self.state is not None and requested in ("auto", "cuda"):
            return str(self.state.device)
        return requested

    def others_done(self) -> int:
        """Records the other processes have written so far (read from their part files, for one progress bar)."""
        if self.out is None or self.shard.world == 1:
            return 0
        done = 0
        for rank, path in enumerate(part_paths(self.out, self.shard.world)):
            if rank == self.shard.rank:
                continue
            for candidate in (path, path.with_name(path.name + PARTIAL_SUFFIX)):
                with contextlib.suppress(OSError):
                    done += candidate.read_bytes().count(b"\n")
        return done

    def merge(self) -> list[Record]:
        """Main process, after every part is finished: interleave the parts into `out` (atomically); drop them."""
        assert self.out is not None
        paths = part_paths(self.out, self.shard.world)
        parts = [read_complete_records(path)[0] if path.is_file() else [] for path in paths]
        records = interleave(parts)
        with RecordWriter(self.out, replace_partial=True) as writer:
            for record in records:
                writer.write(record)
        for path in paths:
            path.unlink(missing_ok=True)
        return records


@contextmanager
def output(out: Path | None, *, resume: bool = False) -> Iterator[Run]:
    """Open `--out` (or stdout, or this process's part file) before any work; merge the parts at the end.

    On failure or Ctrl-C it says what was kept: inside a DidError's one line, or on its own line for Ctrl-C and
    unexpected errors; then it re-raises.
    """
    if launched_world() > 1 and out is None:
        raise UsageError(f"with {launched_world()} processes, pass --out FILE: each writes a part, merged there")
    shard, state = current_shard()
    target = out if shard.world == 1 or out is None else part_path(out, shard)
    writer = RecordWriter(target, resume=resume).open()
    run = Run(writer, shard, state, out)
    try:
        yield run
    except DidError as exc:
        note = writer.abort()
        if note and note not in str(exc):
            raise type(exc)(f"{exc}; {note}") from None
        raise
    except BaseException:
        note = writer.abort()
        if note:
            say(f"kept: {note}")
        raise
    writer.commit()
    if state is None:
        return
    state.wait_for_everyone()
    from accelerate.utils import gather_object

    kept = set().union(*gather_object([{r.id for r in writer.kept}]))
    if shard.is_main:
        records = run.merge()
        made = [record for record in records if record.id not in kept]
        if run.reporter is not None:
            extra = f" ({len(kept)} kept from the interrupted run)" if kept else ""
            run.reporter.summary(len(made), *_totals(made, run.new_stages), f"{extra} on {shard.world} processes")
    state.wait_for_everyone()


def _totals(records: Iterable[Record], new_stages: int) -> tuple[int, int]:
    """Generated tokens and NFEs of the stages this command ran (the summary's numbers)."""
    generated = nfes = 0
    for record in records:
        for stage in record.stages[-new_stages:]:
            is_refine = stage.get("kind") == "refine"
            generated += len(stage.get("remasked", [])) if is_refine else len(record.generated)
            nfes += int(stage.get("nfes", 0))
    return generated, nfes


def write_records(records: Iterable[Record], run: Run, reporter: Reporter, *, new_stages: int) -> int:
    """Stream records to this process's writer, one flushed line each; returns how many were written.

    `new_stages` is how many stages this command ran (their generated tokens and NFEs go into the summary). With
    several processes the summary waits for the merge, where the main process prints it for all of them.
    """
    generated = nfes = 0
    for record in records:
        run.writer.write(record)
        more_generated, more_nfes = _totals([record], new_stages)
        generated, nfes = generated + more_generated, nfes + more_nfes
    run.reporter, run.new_stages = reporter, new_stages
    if run.shard.world == 1:
        kept = f" ({len(run.writer.kept)} kept from the interrupted run)" if run.writer.kept else ""
        reporter.summary(run.writer.count, generated, nfes, kept)
    return run.writer.count
