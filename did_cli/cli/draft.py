"""`did draft`: stage 1, semi-autoregressive drafting with snapshot confidence, JSONL out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._run import Execution, Reporter, check_kv_cache_flags, load, output, unmasking, write_records
from did_cli.config import DraftSettings
from did_cli.errors import InputError, UsageError

NumSamples = Annotated[int, typer.Option("--num-samples", "-n", help="Samples to draw (per prompt).")]
Length = Annotated[
    int | None, typer.Option("--length", help="Sequence length incl. BOS/prompt (default: the model's).")
]
BlockSize = Annotated[int, typer.Option("--block-size", help="Draft block size B1; must divide the length.")]
Prompt = Annotated[str | None, typer.Option("--prompt", help="Condition every sample on this text.")]
PromptFile = Annotated[Path | None, typer.Option("--prompt-file", help="One prompt per line (UTF-8).")]
RejectEntropy = Annotated[
    float,
    typer.Option(
        "--reject-entropy",
        help="Redraw a sample whose last 256 tokens fall below this unigram entropy (nats), as BD3-LM; 0 = off.",
    ),
]
MaxTries = Annotated[int, typer.Option("--max-tries", help="Draws per sample before failing (BD3-LM: 10).")]
VarLength = Annotated[
    bool, typer.Option("--var-length", help="Stop each sample at its first generated EOS, kept (BD3-LM var_length).")
]


def read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str] | None:
    """Prompts from --prompt or --prompt-file (one per non-empty line)."""
    if prompt is not None and prompt_file is not None:
        raise UsageError("pass --prompt or --prompt-file, not both")
    if prompt_file is None:
        if prompt is not None and not prompt.strip():
            raise UsageError("--prompt is empty; leave it out for unconditional samples")
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


def check_num_samples(num_samples: int, batch_size: int) -> None:
    """Count options, checked before the model loads."""
    if num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")


@handle_errors
def draft(
    model: o.Model = None,
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    num_samples: NumSamples = 1,
    length: Length = None,
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
    reject_entropy: RejectEntropy = 4.0,
    max_tries: MaxTries = 10,
    var_length: VarLength = False,
    prompt: Prompt = None,
    prompt_file: PromptFile = None,
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
    from did_cli import api

    prompts = read_prompts(prompt, prompt_file)
    check_num_samples(num_samples, batch_size)
    check_kv_cache_flags(kv_cache_dtype, no_kv_cache)
    sampling = unmasking(order, steps_per_block, tokens_per_call, top_p, temperature, confidence_threshold)
    if length is not None:
        DraftSettings(length=length, block_size=block_size, unmasking=sampling)  # bad values fail before loading
    execution = Execution(attn_backend, compile, cuda_graphs, kv_cache_dtype)
    with output(out, resume=resume) as run:
        loaded, tok = load(model or o.DEFAULT_MODEL, tokenizer, revision, run.device(device), dtype, execution)
        settings = DraftSettings(
            length=loaded.config.model_length if length is None else length,
            block_size=block_size,
            kv_cache=not no_kv_cache,
            unmasking=sampling,
            reject_entropy=reject_entropy,
            max_tries=max_tries,
            var_length=var_length,
        )
        skip = api.check_resumable(run.writer.kept, [api.draft_stage_settings(settings, seed)], loaded)
        total = num_samples * (len(prompts) if prompts else 1)
        with Reporter(quiet or not run.shard.is_main, total, run.others_done) as reporter:
            records = api.draft(
                loaded,
                tok,
                settings,
                num_samples=num_samples,
                seed=seed,
                batch_size=batch_size,
                prompts=prompts,
                skip_ids=skip,
                shard=run.shard,
                on_progress=reporter,
            )
            write_records(records, run, reporter, new_stages=1)
