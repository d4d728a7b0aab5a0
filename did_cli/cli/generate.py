"""`did generate`: draft then refine in one process, writing the records a `draft | refine` pipe would."""

from __future__ import annotations

from typing import Annotated

import typer

from did_cli import api
from did_cli.checkpoints import DEFAULT_MODEL
from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._run import Reporter, load, unmasking, write_records
from did_cli.cli.draft import Length, NumSamples, Prompt, PromptFile, read_prompts
from did_cli.config import DraftSettings, RefineSettings, check_block_size
from did_cli.errors import UsageError

Stages = Annotated[
    str | None,
    typer.Option("--stages", help="Block sizes per stage, e.g. 4,1024 (draft B1, then each refine B2; default 4,L)."),
]
BlockSize = Annotated[
    int | None, typer.Option("--block-size", help="Draft block size B1 (same as the first --stages).")
]
Gammas = Annotated[str, typer.Option("--gamma", help="Remask fraction per refine stage: one value or a list.")]
Remask = Annotated[str, typer.Option("--remask", help="snapshot, posthoc or random.")]


def parse_stages(stages: str | None, block_size: int | None, length: int) -> list[int]:
    """Block sizes per stage; a size at least the length means one global block."""
    if stages is None:
        return [block_size or 4, length]
    try:
        sizes = [int(part) for part in stages.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--stages must be comma-separated integers, got {stages!r}") from None
    if len(sizes) < 1 or any(s < 1 for s in sizes):
        raise UsageError(f"--stages needs positive block sizes, got {stages!r}")
    if block_size is not None and block_size != sizes[0]:
        raise UsageError(f"--block-size {block_size} disagrees with the first of --stages {stages}")
    return sizes


def parse_gammas(gammas: str, refine_stages: int) -> list[float]:
    """One gamma per refine stage; a single value applies to all."""
    try:
        values = [float(part) for part in gammas.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--gamma must be a number or a comma-separated list, got {gammas!r}") from None
    if len(values) == 1:
        values = values * refine_stages
    if len(values) != refine_stages:
        raise UsageError(f"--gamma gives {len(values)} values for {refine_stages} refine stages")
    return values


@handle_errors(on_interrupt="interrupted: every finished sample has been written")
def generate(
    model: o.Model = DEFAULT_MODEL,
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    num_samples: NumSamples = 1,
    length: Length = None,
    stages: Stages = None,
    block_size: BlockSize = None,
    gamma: Gammas = "0.5",
    remask: Remask = "snapshot",
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
    """Draft with small blocks, then globally revise the least confident tokens (JSONL)."""
    prompts = read_prompts(prompt, prompt_file)
    sampling = unmasking(order, steps_per_block, tokens_per_call, top_p, temperature)
    if length is not None and stages is not None:
        # Check every stage before loading anything: a bad B2 must not cost a whole draft first.
        for size in parse_stages(stages, block_size, length):
            check_block_size(size, length)
    loaded, tok = load(
        model, tokenizer, revision, device, dtype, attn_backend=attn_backend, compile=compile, cuda_graphs=cuda_graphs
    )
    length = loaded.config.model_length if length is None else length
    sizes = parse_stages(stages, block_size, length)
    for size in sizes:
        check_block_size(size, length)
    gammas = parse_gammas(gamma, len(sizes) - 1)
    draft_settings = DraftSettings(length=length, block_size=sizes[0], kv_cache=not no_kv_cache, unmasking=sampling)
    refine_settings = [
        RefineSettings(
            gamma=g,
            block_size=None if size >= length else size,
            remask=remask,
            kv_cache=not no_kv_cache,
            unmasking=sampling,
        )
        for size, g in zip(sizes[1:], gammas, strict=True)
    ]
    total = num_samples * (len(prompts) if prompts else 1)
    with Reporter(quiet, total) as reporter:
        records = api.generate(
            loaded,
            tok,
            draft_settings,
            refine_settings,
            num_samples=num_samples,
            seed=seed,
            batch_size=batch_size,
            prompts=prompts,
            on_progress=reporter,
        )
        write_records(records, out, reporter, new_stages=len(sizes))
