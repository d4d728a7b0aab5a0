"""`did draft`: stage 1, semi-autoregressive drafting with snapshot confidence, JSONL out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from did_cli import api
from did_cli.checkpoints import DEFAULT_MODEL
from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._run import Reporter, load, unmasking, write_records
from did_cli.config import DraftSettings
from did_cli.errors import InputError, UsageError

NumSamples = Annotated[int, typer.Option("--num-samples", "-n", help="Samples to draw (per prompt).")]
Length = Annotated[
    int | None, typer.Option("--length", help="Sequence length incl. BOS/prompt (default: the model's).")
]
BlockSize = Annotated[int, typer.Option("--block-size", help="Draft block size B1; must divide the length.")]
Prompt = Annotated[str | None, typer.Option("--prompt", help="Condition every sample on this text.")]
PromptFile = Annotated[Path | None, typer.Option("--prompt-file", help="One prompt per line.")]


def read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str] | None:
    """Prompts from --prompt or --prompt-file (one per non-empty line)."""
    if prompt is not None and prompt_file is not None:
        raise UsageError("pass --prompt or --prompt-file, not both")
    if prompt_file is None:
        return [prompt] if prompt is not None else None
    if not prompt_file.is_file():
        raise InputError(f"prompt file {prompt_file} does not exist")
    prompts = [line.rstrip("\n") for line in prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {prompt_file} holds no prompt")
    return prompts


@handle_errors(on_interrupt="interrupted: every finished sample has been written")
def draft(
    model: o.Model = DEFAULT_MODEL,
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    num_samples: NumSamples = 1,
    length: Length = None,
    block_size: BlockSize = 4,
    seed: o.Seed = 0,
    batch_size: o.BatchSize = 1,
    top_p: o.TopP = 0.9,
    temperature: o.Temperature = 1.0,
    order: o.Order = "first-hitting",
    steps_per_block: o.StepsPerBlock = None,
    tokens_per_call: o.TokensPerCall = 1,
    no_kv_cache: o.NoKVCache = False,
    prompt: Prompt = None,
    prompt_file: PromptFile = None,
    out: o.Out = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "float32",
    attn_backend: o.AttnBackend = "auto",
    compile: o.Compile = False,
    cuda_graphs: o.CudaGraphs = False,
    quiet: o.Quiet = False,
) -> None:
    """Draft samples block by block with the KV cache, recording each token's snapshot confidence (JSONL)."""
    prompts = read_prompts(prompt, prompt_file)
    sampling = unmasking(order, steps_per_block, tokens_per_call, top_p, temperature)
    loaded, tok = load(
        model, tokenizer, revision, device, dtype, attn_backend=attn_backend, compile=compile, cuda_graphs=cuda_graphs
    )
    settings = DraftSettings(
        length=loaded.config.model_length if length is None else length,
        block_size=block_size,
        kv_cache=not no_kv_cache,
        unmasking=sampling,
    )
    total = num_samples * (len(prompts) if prompts else 1)
    with Reporter(quiet, total) as reporter:
        records = api.draft(
            loaded,
            tok,
            settings,
            num_samples=num_samples,
            seed=seed,
            batch_size=batch_size,
            prompts=prompts,
            on_progress=reporter,
        )
        write_records(records, out, reporter, new_stages=1)
