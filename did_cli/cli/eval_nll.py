"""`did eval-nll`: the NELBO (nats per token) and its perplexity bound per model and block size, as a table."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._options import check_count
from did_cli.cli._progress import keyed_bars, say, stderr
from did_cli.errors import UsageError
from did_cli.evaluation.zero_shot import PRESETS
from did_cli.files import output_target, refuse_overwriting_inputs, stdout_stream, strict_json, write_output
from did_cli.printable import printable
from did_cli.settings import check_device_name, dtype_name

if TYPE_CHECKING:
    from did_cli.evaluation import nll as likelihood

Models = Annotated[
    list[str],
    typer.Option("--model", "-m", help="Model to score (repeat to compare): embedded name, folder or Hub id."),
]
Data = Annotated[
    str | None, typer.Option("--data", help="Local .txt/.jsonl/.parquet file or folder, or a Hugging Face dataset id.")
]
Preset = Annotated[str | None, typer.Option("--preset", help=f"Zero-shot set: {', '.join(PRESETS)}.")]
BlockSizes = Annotated[
    str, typer.Option("--block-size", help="Comma-separated block sizes; a size >= L is one global block (MDLM).")
]
SeqLen = Annotated[int | None, typer.Option("--seq-len", help="Row length L (default: the model's length).")]
NumSamples = Annotated[int | None, typer.Option("--num-samples", help="Score only the first N rows (default: all).")]
NoiseDraws = Annotated[
    int, typer.Option("--noise-draws", help="Noise draws (t and masks) per row, averaged; lowers the error.")
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", help="Sequences (rows x noise draws) per forward pass; never changes results.")
]
Clip = Annotated[
    str | None,
    typer.Option("--clip", help="Score a clipped schedule EPS_MIN,EPS_MAX or 4=0.5,1;... (default: the true bound)."),
]
NoiseLayout = Annotated[
    str,
    typer.Option(
        "--noise-layout",
        help="row: t stratified within each row (any batch size, same number); batch: upstream's ppl_eval layout, "
        "t stratified over --batch-size rows x blocks (the number moves with the batch size).",
    ),
]
NoWrap = Annotated[
    bool, typer.Option("--no-wrap", help="One row per document: [BOS] doc [EOS], truncated, padded (never scored).")
]
Layout = Annotated[
    str | None,
    typer.Option("--wrap-format", help="train (documents + EOS cut into rows) or bos-eos (upstream's zero-shot)."),
]
DataConfig = Annotated[str | None, typer.Option("--data-config", help="Dataset configuration (Hub datasets).")]
DataSplit = Annotated[str, typer.Option("--data-split", help="Dataset split (Hub datasets).")]
TextField = Annotated[str, typer.Option("--text-field", help="Column holding the text.")]
JsonOut = Annotated[
    Path | None, typer.Option("--json", help="Write results, settings, data fingerprint and versions (- = stdout).")
]
PerSequence = Annotated[
    Path | None, typer.Option("--per-sequence", help="Write one JSON line per model, block size and row here.")
]


@handle_errors(on_interrupt="interrupted: no result was written", on_memory="lower --batch-size or --noise-draws")
def eval_nll(
    model: Models,
    data: Data = None,
    preset: Preset = None,
    block_size: BlockSizes = "4,16,1024",
    seq_len: SeqLen = None,
    num_samples: NumSamples = None,
    noise_draws: NoiseDraws = 1,
    batch_size: BatchSize = 16,
    seed: o.Seed = 0,
    clip: Clip = None,
    noise_layout: NoiseLayout = "row",
    no_wrap: NoWrap = False,
    wrap_format: Layout = None,
    data_config: DataConfig = None,
    data_split: DataSplit = "test",
    text_field: TextField = "text",
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "float32",
    json_out: JsonOut = None,
    per_sequence: PerSequence = None,
    quiet: o.Quiet = False,
) -> None:
    """NELBO per token and exp(NELBO), the perplexity bound, for each model and block size (BD3-LM's ppl_eval)."""
    from did_cli.evaluation.settings import NllData, NllSettings
    from did_cli.processes import current_processes

    # Every option but --clip is checked before torch is imported (option errors answer at once).
    check_count(noise_draws, "--noise-draws")
    check_count(batch_size, "--batch-size")
    check_count(num_samples, "--num-samples")
    check_device_name(device)
    dtype_name(dtype)
    settings = NllSettings(
        block_sizes=_sizes(block_size),
        noise_draws=noise_draws,
        batch_size=batch_size,
        seed=seed,
        noise_layout=noise_layout,
    )
    source = NllData(
        data=data,
        preset=preset,
        config=data_config,
        split=data_split,
        text_field=text_field,
        seq_len=seq_len,
        layout=_layout(no_wrap, wrap_format, preset),
        num_samples=num_samples,
    )
    if per_sequence is not None and str(per_sequence) == "-":
        raise UsageError("--per-sequence needs a file name; only --json can go to stdout")
    outputs = [("--json", json_out), ("--per-sequence", per_sequence)]
    for flag, out in outputs:
        if out is not None and str(out) != "-":
            output_target(out, flag)  # unwritable outputs fail before any model loads
        elif out is not None:
            stdout_stream(f"pass {flag} FILE")
    refuse_overwriting_inputs(outputs, [("--data", data)])  # a Hub id is no local path: nothing to overwrite
    from did_cli.evaluation import nll as likelihood

    settings = dataclasses.replace(settings, clip=_clip(clip))  # --clip is parsed by the noise code (torch)
    processes = current_processes()
    bars = keyed_bars(quiet or not processes.is_main, "rows", lambda name, block: f"{name} B={block}")
    with bars as on_progress:
        result = likelihood.eval_nll(
            model,
            source,
            settings,
            tokenizer=tokenizer,
            revision=revision,
            device=processes.device_for(device),
            dtype=dtype,
            on_progress=on_progress,
            processes=processes,
        )
    if not processes.is_main:
        return  # every process holds the same gathered result; the main process writes it once
    for note in result.notes:
        say(f"note: {note}")
    if json_out is not None:
        write_output(json_out, strict_json(result.to_dict(), indent=2) + "\n")
    if per_sequence is not None:
        lines = [
            {
                "model": r.model,
                "block_size": r.block_size,
                "row": row.row,
                "nelbo": row.nelbo,
                "nll": row.nll,
                "tokens": row.tokens,
            }
            for r in result.results
            for row in r.rows
        ]
        write_output(per_sequence, "".join(strict_json(line) + "\n" for line in lines))
    if not quiet:
        stderr.print(_table(result))


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--block-size must be comma-separated integers, got {text!r}") from None
    if not sizes:
        raise UsageError("--block-size is empty")
    return sizes


def _clip(text: str | None) -> Any:
    from did_cli.noise import AUTO_CLIP, parse_clip

    if text is None:
        return None
    clip = parse_clip(text)
    if clip == AUTO_CLIP:
        raise UsageError("--clip auto is a training option; give the interval to score")
    return clip


def _layout(no_wrap: bool, wrap_format: str | None, preset: str | None) -> str:
    if no_wrap:
        if wrap_format is not None:
            raise UsageError("--wrap-format applies to wrapped rows; drop it with --no-wrap")
        return "document"
    if wrap_format is None:
        return "bos-eos" if preset is not None else "wrap"
    if wrap_format not in ("train", "bos-eos"):
        raise UsageError(f"--wrap-format must be train or bos-eos, got {wrap_format!r}")
    return "wrap" if wrap_format == "train" else "bos-eos"


def _table(result: likelihood.NllResult) -> Table:
    settings = result.settings
    clip = "unclipped t ~ U[1e-3, 1]" if settings["clip"] is None else f"clip {settings['clip']}"
    first = next(iter(result.data.values()))
    title = (
        f"NELBO on {first['rows']} rows of {first['seq_len']} tokens ({first['layout']}), {clip}, "
        f"{settings['noise_draws']} noise draw(s) per row, seed {settings['seed']}"
    )
    caption = (
        "NELBO: nats per scored token (position 0 and padding not scored), token-weighted as BD3-LM's ppl_eval; "
        "± one standard error over sequences; PPL ≤ exp(NELBO); B = 1 is the exact NLL"
    )
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("model", overflow="fold")
    for header in ("B", "NELBO", "± s.e.", "PPL ≤", "seqs", "tokens", "time (s)"):
        table.add_column(header, justify="right")
    for r in result.results:
        error = r.stderr
        table.add_row(
            Text(printable(r.model)),  # a name or folder as given: shown, never obeyed or read as markup
            str(r.block_size),
            f"{r.nelbo:.4f}",
            f"{error:.4f}" if math.isfinite(error) else "—",
            f"{math.exp(r.nelbo):.2f}",
            str(len(r.rows)),
            str(r.tokens),
            f"{r.seconds:.1f}",
        )
    return table
