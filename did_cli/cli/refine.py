"""`did refine`: remask the least trusted tokens of draft records and re-denoise them with a large block."""

from __future__ import annotations

from typing import Annotated

import typer

from did_cli import api
from did_cli.checkpoints import DEFAULT_MODEL
from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._run import Reporter, load, unmasking, write_records
from did_cli.config import RefineSettings
from did_cli.errors import UsageError
from did_cli.records import read_records, same_file

Input = Annotated[str, typer.Argument(help="Draft records (JSONL file), or - for stdin.")]
Gamma = Annotated[float, typer.Option("--gamma", help="Fraction of generated tokens to remask, in [0, 1].")]
BlockSize = Annotated[
    int | None, typer.Option("--block-size", help="Refine block size B2 (default: the whole sequence, one block).")
]
Remask = Annotated[str, typer.Option("--remask", help="Which tokens to remask: snapshot, posthoc or random.")]


@handle_errors(on_interrupt="interrupted: every finished sample has been written")
def refine(
    input: Input = "-",
    model: o.Model = DEFAULT_MODEL,
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    gamma: Gamma = 0.5,
    block_size: BlockSize = None,
    remask: Remask = "snapshot",
    seed: o.Seed = 0,
    batch_size: o.BatchSize = 1,
    top_p: o.TopP = 0.9,
    temperature: o.Temperature = 1.0,
    order: o.Order = "first-hitting",
    steps_per_block: o.StepsPerBlock = None,
    tokens_per_call: o.TokensPerCall = 1,
    no_kv_cache: o.NoKVCache = False,
    force: o.Force = False,
    out: o.Out = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "float32",
    attn_backend: o.AttnBackend = "auto",
    compile: o.Compile = False,
    cuda_graphs: o.CudaGraphs = False,
    quiet: o.Quiet = False,
) -> None:
    """Remask the bottom-gamma tokens of each record (by snapshot confidence) and re-denoise them (JSONL)."""
    settings = RefineSettings(
        gamma=gamma,
        block_size=block_size,
        remask=remask,
        kv_cache=not no_kv_cache,
        unmasking=unmasking(order, steps_per_block, tokens_per_call, top_p, temperature),
    )
    if same_file(input, out):
        raise UsageError(f"--out {out} is the input file; write the refined records somewhere else")
    records = read_records(input)
    loaded, tok = load(
        model, tokenizer, revision, device, dtype, attn_backend=attn_backend, compile=compile, cuda_graphs=cuda_graphs
    )
    with Reporter(quiet, None) as reporter:
        refined = api.refine(
            loaded, tok, records, settings, seed=seed, batch_size=batch_size, force=force, on_progress=reporter
        )
        write_records(refined, out, reporter, new_stages=1)
