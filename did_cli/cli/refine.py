"""`did refine`: remask the least trusted tokens of draft records and re-denoise them with a large block."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Annotated

import typer

from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._options import check_count, flag, given
from did_cli.cli._progress import say
from did_cli.cli._sampling import (
    Execution,
    Reporter,
    check_execution,
    edit_settings,
    load,
    output,
    strategy_flags,
    unmasking,
    write_records,
)
from did_cli.errors import InputError, UsageError
from did_cli.records import Record, read_records
from did_cli.settings import EditSettings, RefineSettings

Input = Annotated[str, typer.Argument(help="Draft records (JSONL file), or - for stdin.")]
Gamma = Annotated[float, typer.Option("--gamma", help="Fraction of generated tokens to remask, in [0, 1].")]
BlockSize = Annotated[
    int | None, typer.Option("--block-size", help="Refine block size B2 (default: the whole sequence, one block).")
]
Remask = Annotated[str, typer.Option("--remask", help=o.REMASK_HELP)]


@handle_errors
def refine(
    ctx: typer.Context,
    input: Input = "-",
    model: o.RecordsModel = None,
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    gamma: Gamma = 0.5,
    block_size: BlockSize = None,
    remask: Remask = "snapshot",
    seed: o.SamplingSeed = 0,
    batch_size: o.BatchSize = o.DEFAULT_BATCH_SIZE,
    top_p: o.TopP = 0.9,
    temperature: o.Temperature = 1.0,
    order: o.Order = None,
    steps_per_block: o.StepsPerBlock = None,
    tokens_per_call: o.TokensPerCall = 1,
    confidence_threshold: o.ConfidenceThreshold = None,
    refine_cache: o.RefineCache = 1,
    passes: o.Passes = 8,
    ensemble_ratio: o.EnsembleRatio = 0.5,
    edit_threshold: o.EditThreshold = None,
    edit_passes: o.EditPasses = 1,
    edit_candidate: o.EditCandidate = "argmax",
    no_kv_cache: o.NoKVCache = False,
    force: o.Force = False,
    out: o.Out = None,
    resume: o.Resume = False,
    device: o.Device = "auto",
    dtype: o.SamplingDtype = "float32",
    kv_cache_dtype: o.KVCacheDtype = None,
    attn_backend: o.AttnBackend = "auto",
    compile: o.Compile = False,
    cuda_graphs: o.CudaGraphs = False,
    quiet: o.Quiet = False,
) -> None:
    """Remask the bottom-gamma tokens of each record (by snapshot confidence) and re-denoise them, or edit (JSONL)."""
    from did_cli.processes import current_processes
    from did_cli.provenance import Identity, expect_refinements, record_model

    # Every option is checked before torch is imported (option errors answer at once) and before any model loads.
    check_count(batch_size, "--batch-size")
    check_execution(device, dtype, kv_cache_dtype, no_kv_cache, attn_backend)
    settings: RefineSettings | EditSettings | None = edit_settings(
        ctx, edit_threshold, edit_passes, edit_candidate, top_p, temperature
    )
    if settings is not None:
        remasking = ("gamma", "remask", "block_size", "refine_cache", "passes", "ensemble_ratio", "order")
        unused = given(ctx, *remasking, "steps_per_block", "tokens_per_call", "confidence_threshold", "no_kv_cache")
        if unused:
            raise UsageError(f"{flag(unused[0])} applies to remasking; --edit-threshold edits without remasking")
    else:
        strategy_flags(ctx, remask)
        settings = RefineSettings(
            gamma=gamma,
            block_size=block_size,
            remask=remask,
            kv_cache=not no_kv_cache,
            unmasking=unmasking(order, steps_per_block, tokens_per_call, top_p, temperature, confidence_threshold),
            refine_cache=refine_cache,
            passes=passes,
            ensemble_ratio=ensemble_ratio,
        )
    if input == "-" and sys.stdin is not None and sys.stdin.isatty():
        raise UsageError("refine reads records from stdin: pipe them in (did draft | did refine) or name a file")
    processes = current_processes()
    if input == "-" and processes.world > 1:
        raise UsageError(f"with {processes.world} processes, refine reads its input from a file, not stdin")
    # A file is read once in full first: a bad line fails before any work, and ids give each record its position.
    ids = input_ids(input) if input != "-" else None
    # stdin can be read only once: a resumed run keeps its records to check the kept ones against.
    buffered = list(read_records(input)) if resume and ids is None else None

    def inputs() -> Iterator[Record]:
        return iter(buffered) if buffered is not None else read_records(input)

    records = inputs()
    first = next(records)
    records = itertools.chain([first], records)
    execution = Execution(attn_backend, compile, cuda_graphs, kv_cache_dtype)
    position = None if ids is None else _positions(ids)
    source = [("records file", input)]
    with output(out, processes, resume=resume, position=position, inputs=source, quiet=quiet) as records_out:
        from did_cli import api

        name = model or record_model(first)
        if name is None:
            raise InputError("the records do not name the model that made them; pass --model")
        loaded, tok = load(name, tokenizer, revision, processes.device_for(device), dtype, execution)
        size = getattr(settings, "block_size", None)
        if size is not None and size > len(first.tokens) and processes.is_main:
            length = len(first.tokens)
            say(f"note: refine block size {size} is longer than the records ({length} tokens): one global block")
        kept = records_out.kept_ids
        if kept:
            sources = (record for record in inputs() if record.id in kept)
            records_out.check_kept(expect_refinements(Identity.of(loaded, tok), settings, seed, sources))
        with Reporter(quiet or not processes.is_main, len(ids) if ids else None, records_out.others_done) as reporter:
            refined = api.refine(
                loaded,
                tok,
                records,
                settings,
                seed=seed,
                batch_size=batch_size,
                force=force,
                skip_ids=kept,
                processes=processes,
                on_progress=reporter,
            )
            write_records(refined, records_out, reporter, new_stages=1)


def input_ids(source: str) -> list[int]:
    """The ids of a records file in order, read once in full so a bad line fails before any work.

    Raises:
        InputError: a malformed line, or an id that appears twice (ids key resumed and multi-process work).
    """
    ids: list[int] = []
    seen: dict[int, int] = {}
    for number, record in enumerate(read_records(source), start=1):
        if record.id in seen:
            raise InputError(f"{source} holds sample {record.id} twice (records {seen[record.id]} and {number})")
        seen[record.id] = number
        ids.append(record.id)
    return ids


def _positions(ids: list[int]) -> Callable[[Record], int]:
    """A refined record's input position: which process owns it, and its place in --out."""
    where = {sample_id: position for position, sample_id in enumerate(ids)}
    return lambda record: where.get(record.id, len(where))
