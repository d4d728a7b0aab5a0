"""Plumbing shared by the sampling commands (draft, refine, generate): prompts, loading, progress, the output file.

stdout carries records only; when stdout is a terminal one note on stderr says how to read them. Progress goes to
stderr (`_progress`): on a terminal a start-up line while torch and the model load, then a bar naming the stage that
runs; plain rate-limited lines when stderr is not a terminal (logs, batch jobs); and a closing summary in both cases
unless `--quiet`. Heavy modules (torch, the model code) are imported inside the functions so `did --help` and option
errors answer at once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import Progress, TextColumn

from did_cli.cli._options import check_count
from did_cli.cli._progress import PlainLines, bar, say, set_status, status, stderr
from did_cli.errors import DidError, InputError, UsageError
from did_cli.files import refuse_overwriting_inputs
from did_cli.processes import Processes
from did_cli.record_files import RecordOutput
from did_cli.records import Record
from did_cli.settings import (
    DraftSettings,
    EditSettings,
    UnmaskingSettings,
    check_attn_backend,
    check_device_name,
    check_kv_cache_dtype_name,
    dtype_name,
)

if TYPE_CHECKING:
    from did_cli.api import Progress as ProgressEvent
    from did_cli.model import BD3LM


def read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str] | None:
    """Prompts from --prompt or --prompt-file (one per non-empty line)."""
    if prompt is not None and prompt_file is not None:
        raise UsageError("pass --prompt or --prompt-file, not both")
    if prompt_file is None:
        if prompt is not None and not prompt.strip():
            raise UsageError("--prompt is empty; leave it out for unconditional samples")
        if prompt is not None and not _is_unicode(prompt):
            raise UsageError("--prompt holds bytes that are not UTF-8 text; check the terminal's encoding")
        return [prompt] if prompt is not None else None
    if prompt_file.is_dir():
        raise InputError(f"prompt file {prompt_file} is a directory")
    if not prompt_file.is_file():
        raise InputError(f"prompt file {prompt_file} does not exist")
    try:
        text = prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"prompt file {prompt_file} is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"cannot read prompt file {prompt_file}: {exc.strerror}") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {prompt_file} holds no prompt")
    return prompts


def note_settings(ctx: Any, settings: DraftSettings, sizes: list[int], processes: Processes) -> None:
    """Say once (main process, even with --quiet) where a setting cannot act as written, instead of recording it.

    BD3-LM checks stop conditions only once a sample is longer than its 256-token window, so --var-length cuts
    nothing and --reject-entropy / --max-tries redraw nothing at or below it; a block size beyond the length is one
    global block of the length.
    """
    from did_cli.cli._options import given

    if not processes.is_main:
        return
    length, window = settings.length, settings.entropy_window
    if settings.var_length and length <= window:
        say(
            f"note: --var-length cuts no sample at --length {length}: BD3-LM checks for EOS only once a sample is "
            f"longer than {window} tokens"
        )
    explicit = [f"--{name.replace('_', '-')}" for name in given(ctx, "reject_entropy", "max_tries")]
    if explicit and length <= window:
        say(
            f"note: {' and '.join(explicit)} cannot act at --length {length}: BD3-LM checks entropy only once a "
            f"sample is longer than {window} tokens"
        )
    for stage, size in enumerate(sizes):
        if size > length:
            kind = "draft" if stage == 0 else "refine"
            say(f"note: {kind} block size {size} is longer than --length {length}: one global block of {length} tokens")


def _is_unicode(text: str) -> bool:
    # Bytes of an argument that are not UTF-8 reach Python as lone surrogates, which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def strategy_flags(ctx: Any, remask: str) -> None:
    """Refuse --passes / --ensemble-ratio where the remask strategy would ignore them (a silent no-op otherwise)."""
    from did_cli.cli._options import flag, given
    from did_cli.settings import canonical_remask

    strategy = canonical_remask(remask)
    ignored = {
        "passes": strategy not in ("mc-dropout", "mc-variance", "noise-ensemble"),
        "ensemble_ratio": strategy != "noise-ensemble",
    }
    unused = [name for name in given(ctx, *ignored) if ignored[name]]
    if unused:
        raise UsageError(f"{flag(unused[0])} does not apply to --remask {strategy}")


def edit_settings(
    ctx: Any, threshold: float | None, passes: int, candidate: str, top_p: float, temperature: float
) -> EditSettings | None:
    """The editing stage `--edit-threshold` asks for, or None; its other flags refused without it."""
    from did_cli.cli._options import flag, given

    if threshold is None:
        unused = given(ctx, "edit_passes", "edit_candidate")
        if unused:
            raise UsageError(f"{flag(unused[0])} applies to --edit-threshold; add it or drop {flag(unused[0])}")
        return None
    return EditSettings(threshold, passes, candidate, UnmaskingSettings(top_p=top_p, temperature=temperature))


def check_num_samples(num_samples: int, batch_size: int) -> None:
    """Count options, checked before the model loads."""
    check_count(num_samples, "--num-samples")
    check_count(batch_size, "--batch-size")


def check_execution(device: str, dtype: str, kv_cache_dtype: str | None, no_kv_cache: bool, attn_backend: str) -> None:
    """The names of how the model runs, checked before torch is imported (a misspelt flag fails at once).

    Also refuses a cache dtype that would not act: with --no-kv-cache no cache is made.
    """
    check_device_name(device)
    dtype_name(dtype)
    check_kv_cache_dtype_name(kv_cache_dtype)
    check_attn_backend(attn_backend)
    if no_kv_cache and kv_cache_dtype is not None:
        raise UsageError(f"--kv-cache-dtype {kv_cache_dtype} has no effect with --no-kv-cache; drop one of them")


def check_stand_in_draft(
    length: int | None, block_size: int, sampling: UnmaskingSettings, reject_entropy: float, max_tries: int
) -> None:
    """Check the draft settings before the model loads; without --length, against a length any block size divides.

    The model's length is known only once it loads: `check_block_size` then checks B1 against it.
    """
    DraftSettings(
        length=length if length is not None else 2 * max(block_size, 1),
        block_size=block_size,
        unmasking=sampling,
        reject_entropy=reject_entropy,
        max_tries=max_tries,
    )


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
    from did_cli.checkpoints import load_model, load_tokenizer
    from did_cli.execution import optimize

    check_attn_backend(execution.attn_backend)
    set_status(f"loading {model}")
    loaded = load_model(model, device=device, dtype=dtype, revision=revision, kv_cache_dtype=execution.kv_cache_dtype)
    optimize(loaded, attn_backend=execution.attn_backend, compile=execution.compile, cuda_graphs=execution.cuda_graphs)
    return loaded, load_tokenizer(loaded, tokenizer)


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


class Reporter:
    """Progress and the closing summary on stderr (see the module docstring); silent with `quiet`.

    The bar counts finished samples and moves within a batch as its stages commit tokens (each stage an equal share of
    the batch), so the time left is estimated before the first batch ends; beside it, the running stage's tokens and
    model calls on the current batch.
    """

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
            self._progress = bar("samples", TextColumn("{task.fields[tokens]}", markup=False))
            self._progress.start()
            self._task = self._progress.add_task("sampling", total=self._total, tokens="", finished=0)
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
        stage = event.stage if event.stages == 1 else f"{event.stage} (stage {event.stage_index + 1}/{event.stages})"
        if self._progress is not None:
            share = event.tokens_done / event.tokens_total if event.tokens_total else 0.0
            completed = done + event.batch * (event.stage_index + share) / event.stages
            task = self._progress.tasks[0]
            # A new stage is drawn at once: at the display's 10 refreshes a second a short stage could go unseen.
            refresh = stage != task.description
            task_fields = dict(finished=done, tokens=_work(event))
            self._progress.update(
                self._task, completed=completed, description=stage, total=total, refresh=refresh, **task_fields
            )
            return
        of_total = f"/{total}" if total else ""
        self._lines(f"{stage}: {done}{of_total} samples finished")

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


@contextmanager
def output(
    out: Path | None,
    processes: Processes,
    *,
    resume: bool = False,
    position: Any = None,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
    quiet: bool = False,
) -> Iterator[RecordOutput]:
    """Open `--out` (or stdout, or this process's part file) before any work; finish (merge the parts) at the end.

    `--out` naming one of the `inputs` ((flag, path) pairs: a records file, a prompt file) is refused first. On
    failure or Ctrl-C it says what was kept: inside a DidError's one line, or on its own line for Ctrl-C and
    unexpected errors; then it re-raises. Notes the output found (a dropped damaged line) go to stderr. Unless
    `quiet`, the main process says once how to read records that go to a terminal (`READING_NOTE`), and shows the
    start-up line (`_progress.status`) until the command's progress bar replaces it.
    """
    refuse_overwriting_inputs([("--out", out)], inputs)
    records = RecordOutput(out, processes, resume, **({"position": position} if position is not None else {}))
    records.open()
    for note in records.notes:
        say(f"note: {note}")
    talk = not quiet and processes.is_main
    if talk and out is None and stdout_is_terminal():
        say(READING_NOTE)
    try:
        with status("starting: importing torch and the model code", enabled=talk):
            yield records
    except DidError as exc:
        note = records.abort()
        if note and note not in str(exc):
            raise type(exc)(f"{exc}; {note}") from None
        raise
    except BaseException:
        note = records.abort()
        if note:
            say(f"kept: {note}")
        raise
    records.finish()


def _work(event: ProgressEvent) -> str:
    """The running stage's work on its batch, for the bar: "batch of 16: 37/1024 tokens, 37 calls"."""
    if not event.tokens_total:
        return ""
    calls = "call" if event.calls == 1 else "calls"
    work = f"{event.tokens_done}/{event.tokens_total} tokens, {event.calls} {calls}"
    return f"batch of {event.batch}: {work}" if event.batch else work


# Said once on stderr when records would fill a terminal: the ways to read them.
READING_NOTE = (
    "note: records are JSON lines, meant for a file or a pipe: add `| did show -` to see one as a confidence "
    "heat map, `| did show - --text` to read their text, or `--out FILE` to save them"
)


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal (records written there land on the screen)."""
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except (ValueError, AttributeError):  # closed, or replaced by an object without isatty
        return False


def _totals(records: Iterable[Record], new_stages: int) -> tuple[int, int]:
    """Generated tokens and NFEs of the stages this command ran (the summary's numbers)."""
    generated = nfes = 0
    for record in records:
        for stage in record.stages[-new_stages:]:
            is_refine = stage.get("kind") == "refine"
            generated += len(stage.get("remasked", [])) if is_refine else len(record.generated)
            nfes += int(stage.get("nfes", 0))
    return generated, nfes


def write_records(records: Iterable[Record], output: RecordOutput, reporter: Reporter, *, new_stages: int) -> int:
    """Stream records to this process's output, one flushed line each; returns how many were written.

    `new_stages` is how many stages this command ran (their generated tokens and NFEs go into the summary). With
    several processes every process's totals are gathered and the main process prints one summary for all.
    """
    generated = nfes = 0
    for record in records:
        output.write(record)
        more_generated, more_nfes = _totals([record], new_stages)
        generated, nfes = generated + more_generated, nfes + more_nfes
    processes = output.processes
    made, kept = output.writer.count, len(output.kept)
    if processes.world > 1:
        totals = [part[0] for part in processes.gather([(made, kept, generated, nfes)])]
        made, kept, generated, nfes = (sum(values) for values in zip(*totals, strict=True))
    where = f" on {processes.world} processes" if processes.world > 1 else ""
    extra = f" ({kept} kept from the interrupted run)" if kept else ""
    reporter.summary(made, generated, nfes, extra + where)
    return output.writer.count
