"""`did draft`: stage 1, semi-autoregressive drafting with snapshot confidence, JSONL out."""

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
    load,
    note_settings,
    output,
    read_prompts,
    unmasking,
    write_records,
)
from did_cli.settings import DraftSettings

BlockSize = Annotated[int, typer.Option("--block-size", help="Draft block size B1; must divide the length.")]


@handle_errors
def draft(
    ctx: typer.Context,
    model: o.Model = None,
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    num_samples: o.NumSamples = 1,
    length: o.Length = None,
    block_size: BlockSize = 4,
    seed: o.SamplingSeed = 0,
    batch_size: o.BatchSize = o.DEFAULT_BATCH_SIZE,
    top_p: o.TopP = 0.9,
    temperature: o.Temperature = 1.0,
    order: o.Order = None,
    steps_per_block: o.StepsPerBlock = None,
    tokens_per_call: o.TokensPerCall = 1,
    confidence_threshold: o.ConfidenceThreshold = None,
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
    """Draft samples block by block with the KV cache, recording each token's snapshot confidence (JSONL)."""
    from did_cli.processes import current_processes
    from did_cli.provenance import Identity, expect_drafts

    # Every option is checked before torch is imported (option errors answer at once) and before any model loads.
    prompts = read_prompts(prompt, prompt_file)
    check_num_samples(num_samples, batch_size)
    check_execution(device, dtype, kv_cache_dtype, no_kv_cache, attn_backend)
    sampling = unmasking(order, steps_per_block, tokens_per_call, top_p, temperature, confidence_threshold)
    check_stand_in_draft(length, block_size, sampling, reject_entropy, max_tries)
    execution = Execution(attn_backend, compile, cuda_graphs, kv_cache_dtype)
    processes = current_processes()
    with output(out, processes, resume=resume, inputs=[("--prompt-file", prompt_file)], quiet=quiet) as records_out:
        from did_cli import api

        loaded, tok = load(
            model or o.DEFAULT_MODEL, tokenizer, revision, processes.device_for(device), dtype, execution
        )
        settings = DraftSettings(
            length=loaded.config.model_length if length is None else length,
            block_size=block_size,
            kv_cache=not no_kv_cache,
            unmasking=sampling,
            reject_entropy=reject_entropy,
            max_tries=max_tries,
            var_length=var_length,
        )
        note_settings(ctx, settings, [settings.block_size], processes)
        encoded = api.encode_prompts(tok, prompts)
        skip = records_out.check_kept(expect_drafts(Identity.of(loaded, tok), settings, seed, encoded, num_samples))
        total = num_samples * len(encoded)
        with Reporter(quiet or not processes.is_main, total, records_out.others_done) as reporter:
            records = api.draft(
                loaded,
                tok,
                settings,
                num_samples=num_samples,
                seed=seed,
                batch_size=batch_size,
                prompts=prompts,
                skip_ids=skip,
                processes=processes,
                on_progress=reporter,
            )
            write_records(records, records_out, reporter, new_stages=1)
