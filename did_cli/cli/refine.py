"""`did refine`: remask the least trusted tokens of draft records and re-denoise them with a large block."""

from __future__ import annotations

import itertools
import sys
from typing import Annotated

import typer

from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._run import Execution, Reporter, check_kv_cache_flags, load, output, unmasking, write_records
from did_cli.config import RefineSettings
from did_cli.errors import InputError, UsageError
from did_cli.records import check_records_file, read_records, same_file

Input = Annotated[str, typer.Argument(help="Draft records (JSONL file), or - for stdin.")]
Gamma = Annotated[float, typer.Option("--gamma", help="Fraction of generated tokens to remask, in [0, 1].")]
BlockSize = Annotated[
    int | None, typer.Option("--block-size", help="Refine block size B2 (default: the whole sequence, one block).")
]
Remask = Annotated[
    str, typer.Option("--remask", help="Which tokens to remask: snapshot, posthoc (or post-hoc) or random.")
]


@handle_errors
def refine(
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
    """Remask the bottom-gamma tokens of each record (by snapshot confidence) and re-denoise them (JSONL)."""
    from did_cli import api
    from did_cli.provenance import record_model

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    check_kv_cache_flags(kv_cache_dtype, no_kv_cache)
    settings = RefineSettings(
        gamma=gamma,
        block_size=block_size,
        remask=remask,
        kv_cache=not no_kv_cache,
        unmasking=unmasking(order, steps_per_block, tokens_per_call, top_p, temperature, confidence_threshold),
        refine_cache=refine_cache,
    )
    if refine_cache > 1 and block_size is not None:
        raise UsageError("--refine-cache needs one global refine block; drop --block-size")
    if input == "-" and sys.stdin is not None and sys.stdin.isatty():
        raise UsageError("refine reads records from stdin: pipe them in (did draft | did refine) or name a file")
    if same_file(input, out):
        raise UsageError(f"--out {out} is the input file; write the refined records somewhere else")
    total = check_records_file(input) or None  # a file is read once in full first: a bad line fails before any work
    records = read_records(input)
    first = next(records)
    records = itertools.chain([first], records)
    execution = Execution(attn_backend, compile, cuda_graphs, kv_cache_dtype)
    with output(out, resume=resume) as run:
        name = model or record_model(first)
        if name is None:
            raise InputError("the records do not name the model that made them; pass --model")
        loaded, tok = load(name, tokenizer, revision, run.device(device), dtype, execution)
        stage = api.refine_stage_settings(settings, seed, len(first.tokens))
        skip = api.check_resumable(run.writer.kept, [stage], loaded)
        with Reporter(quiet or not run.shard.is_main, total, run.others_done) as reporter:
            refined = api.refine(
                loaded,
                tok,
                records,
                settings,
                seed=seed,
                batch_size=batch_size,
                force=force,
                skip_ids=skip,
                shard=run.shard,
                on_progress=reporter,
            )
            write_records(refined, run, reporter, new_stages=1)
