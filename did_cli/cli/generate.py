"""`did generate`: draft then refine in one process, writing the records a `draft | refine` pipe would."""

from __future__ import annotations

from typing import Annotated

import typer

from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._sampling import (
    Execution,
    Reporter,
    check_execution,
    check_num_samples,
    check_stand_in_draft,
    edit_settings,
    load,
    note_settings,
    output,
    read_prompts,
    strategy_flags,
    unmasking,
    write_records,
)
from did_cli.errors import UsageError
from did_cli.settings import DraftSettings, EditSettings, RefineSettings, check_block_size

Stages = Annotated[
    str | None,
    typer.Option("--stages", help="Block sizes per stage, e.g. 4,1024 (draft B1, then each refine B2; default 4,L)."),
]
BlockSize = Annotated[
    int | None, typer.Option("--block-size", help="Draft block size B1 (same as the first --stages).")
]
Gammas = Annotated[str, typer.Option("--gamma", help="Remask fraction per refine stage: one value or a list.")]
Remask = Annotated[str, typer.Option("--remask", help=o.REMASK_HELP)]


def parse_stages(stages: str | None, block_size: int | None, length: int) -> list[int]:
    """Block sizes per stage; a size at least the length means one global block."""
    if stages is None:
        return [block_size if block_size is not None else 4, length]
    try:
        sizes = [int(part) for part in stages.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--stages must be comma-separated integers, got {stages!r}") from None
    if len(sizes) < 1 or any(s < 1 for s in sizes):
        raise UsageError(f"--stages needs positive block sizes, got {stages!r}")
    if block_size is not None and block_size != sizes[0]:
        raise UsageError(f"--block-size {block_size} disagrees with the first of --stages {stages}")
    return sizes


def _gamma_values(gammas: str) -> list[float]:
    try:
        return [float(part) for part in gammas.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--gamma must be a number or a comma-separated list, got {gammas!r}") from None


def parse_gammas(gammas: str, refine_stages: int) -> list[float]:
    """One gamma per refine stage; a single value applies to all."""
    values = _gamma_values(gammas)
    if len(values) == 1:
        values = values * refine_stages
    if len(values) != refine_stages:
        raise UsageError(f"--gamma gives {len(values)} values for {refine_stages} refine stages")
    return values


@handle_errors
def generate(
    ctx: typer.Context,
    model: o.Model = None,
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    num_samples: o.NumSamples = 1,
    length: o.Length = None,
    stages: Stages = None,
    block_size: BlockSize = None,
    gamma: Gammas = "0.5",
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
    reject_entropy: o.RejectEntropy = 4.0,
    max_tries: o.MaxTries = 10,
    var_length: o.VarLength = False,
    prompt: o.Prompt = None,
    prompt_file: o.PromptFile = None,
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
    """Draft with small blocks, then globally revise the least confident tokens (JSONL).

    `--edit-threshold` adds an editing stage after the refine stages (`--stages 4` alone: draft, then edit).
    """
    from did_cli.processes import current_processes
    from did_cli.provenance import Identity, expect_drafts

    # Every option is checked before torch is imported (option errors answer at once) and before any model loads.
    prompts = read_prompts(prompt, prompt_file)
    check_num_samples(num_samples, batch_size)
    check_execution(device, dtype, kv_cache_dtype, no_kv_cache, attn_backend)
    sampling = unmasking(order, steps_per_block, tokens_per_call, top_p, temperature, confidence_threshold)
    check_stand_in_draft(length, parse_stages(stages, block_size, 1)[0], sampling, reject_entropy, max_tries)
    for value in _gamma_values(gamma):
        RefineSettings(gamma=value, remask=remask, refine_cache=refine_cache)  # bad values fail before any load
    strategy_flags(ctx, remask)
    editing = edit_settings(ctx, edit_threshold, edit_passes, edit_candidate, top_p, temperature)

    def refinements(length: int) -> tuple[list[int], list[RefineSettings | EditSettings]]:
        """Block sizes per stage and each refine stage's settings (a size >= L is one global block)."""
        sizes = parse_stages(stages, block_size, length)
        for size in sizes:
            check_block_size(size, length)
        if var_length and any(size < length for size in sizes[1:]):
            # A variable-length sample's length is not a multiple of a smaller B2; one global block fits any length.
            raise UsageError("--var-length works only with global refine stages (block size = the length)")
        refine: list[RefineSettings | EditSettings] = [
            RefineSettings(
                gamma=g,
                block_size=None if size >= length else size,
                remask=remask,
                kv_cache=not no_kv_cache,
                unmasking=sampling,
                refine_cache=refine_cache,
                passes=passes,
                ensemble_ratio=ensemble_ratio,
            )
            for size, g in zip(sizes[1:], parse_gammas(gamma, len(sizes) - 1), strict=True)
        ]
        return sizes, refine + ([editing] if editing is not None else [])

    if length is not None:
        refinements(length)  # every stage checked before loading anything: a bad B2 must not cost a whole draft
    execution = Execution(attn_backend, compile, cuda_graphs, kv_cache_dtype)
    processes = current_processes()
    with output(out, processes, resume=resume, inputs=[("--prompt-file", prompt_file)], quiet=quiet) as records_out:
        from did_cli import api

        loaded, tok = load(
            model or o.DEFAULT_MODEL, tokenizer, revision, processes.device_for(device), dtype, execution
        )
        length = loaded.config.model_length if length is None else length
        sizes, refine_settings = refinements(length)

        draft_settings = DraftSettings(
            length=length,
            block_size=sizes[0],
            kv_cache=not no_kv_cache,
            unmasking=sampling,
            reject_entropy=reject_entropy,
            max_tries=max_tries,
            var_length=var_length,
        )
        note_settings(ctx, draft_settings, sizes, processes)
        encoded = api.encode_prompts(tok, prompts)
        identity = Identity.of(loaded, tok)
        expected = expect_drafts(identity, draft_settings, seed, encoded, num_samples, refine_settings)
        skip = records_out.check_kept(expected)
        total = num_samples * len(encoded)
        with Reporter(quiet or not processes.is_main, total, records_out.others_done) as reporter:
            records = api.generate(
                loaded,
                tok,
                draft_settings,
                refine_settings,
                num_samples=num_samples,
                seed=seed,
                batch_size=batch_size,
                prompts=prompts,
                skip_ids=skip,
                processes=processes,
                on_progress=reporter,
            )
            write_records(records, records_out, reporter, new_stages=len(refine_settings) + 1)
