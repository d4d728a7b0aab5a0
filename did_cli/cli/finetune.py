"""`did finetune`: mix-scale block-diffusion fine-tuning (or pretraining) on accelerate.

Events go to stderr: first what the run loads and reads, its rows and tokens, and its plan (steps, batch layout,
where checkpoints, metrics and the final weights go), then every log event on a terminal; in logs and batch jobs
(stderr not a terminal) plain lines, training lines at most one per `PLAIN_INTERVAL_S` seconds. --quiet keeps only
warnings (and the Ctrl-C line). stdout stays empty.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.text import Text

from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._hub import check_push_options, push_final
from did_cli.cli._progress import stderr
from did_cli.errors import UsageError
from did_cli.printable import printable
from did_cli.settings import FinetuneSettings

_D = FinetuneSettings()
PLAIN_INTERVAL_S = 15.0


def _describe_start(event: dict[str, Any]) -> str | None:
    """The events of a run's first minute (loading, tokenising, the plan) as one line of markup, else None."""
    kind = event.get("event")
    if kind == "loading":
        return f"loading {'a fresh ' + event['init'] + ' model' if event['init'] else escape(event['model'])}"
    if kind == "reading":
        also = f" and --valid-data {escape(event['valid_data'])}" if event["valid_data"] else ""
        return f"reading --data {escape(event['data'])}{also} (tokenised once, then cached)"
    if kind == "data":
        return (
            f"data: {event['train_rows']:,} training rows of {event['length']} tokens ({event['train_tokens']:,} "
            f"tokens, {event['epochs']:.2f} epochs over the run), {event['valid_rows']:,} held-out rows "
            f"({event['valid_tokens']:,} tokens)"
        )
    if kind == "start":
        processes, accumulation = event["processes"], event["accumulation"]
        per = (
            f"{processes} process{'es' if processes > 1 else ''} x {accumulation} "
            f"micro-batch{'es' if accumulation > 1 else ''} of {event['micro_batch_size']}"
        )
        when = f"every {event['val_every']} steps and at the end" if event["val_every"] else "at the end"
        validation = (
            f"validating {event['validation_rows']:,} held-out rows {when}; " if event["validation_rows"] else ""
        )
        first = f"from step {event['step']} " if event["step"] else ""
        return (
            f"training {first}to step {event['steps']}: {event['batch_size']} rows ({event['tokens_per_step']:,} "
            f"tokens) per step, {per}; {validation}checkpoints in {escape(event['checkpoints'])} every "
            f"{event['save_every']} steps and at the end, metrics in {escape(event['metrics'])}, final weights to "
            f"{escape(event['final'])}"
        )
    return None


def _describe(event: dict[str, Any]) -> str | None:
    """An event as one line of rich markup (None for events not shown)."""
    kind = event.get("event")
    if kind in ("loading", "reading", "data", "start"):
        return _describe_start(event)
    if kind == "train":
        by_size = " ".join(f"B{k}={v:.3f}" for k, v in event["loss_by_block_size"].items())
        return (
            f"step {event['step']:>7}  loss {event['loss']:.4f}  \\[{by_size}]  lr {event['lr']:.2e}  "
            f"{event['tokens_per_s']:,.0f} tok/s  eta {event['eta_s'] / 60:.1f} min"
        )
    if kind == "validation":
        values = " ".join(f"B{k}={v:.4f}" for k, v in event["nelbo"].items())
        return f"[bold]validation[/] step {event['step']}  NELBO/token {values}"
    if kind == "checkpoint":
        return f"[dim]saved {event['path']}[/]"
    if kind in ("resume", "fresh"):
        return f"[dim]{event.get('checkpoint') and 'resumed from ' + event['checkpoint'] or event['reason']}[/]"
    if kind == "stopping":
        return "stopping after this step to save it (Ctrl-C again to quit without saving)"
    if kind == "done":
        return f"[bold green]done[/]: {event['steps']} steps, exported EMA weights to {event['final']}"
    return None


class _Printer:
    """Prints finetune events on stderr (rich on a terminal, plain and rate-limited otherwise)."""

    def __init__(self, quiet: bool, steps: int) -> None:
        self.quiet, self.steps = quiet, steps
        self.terminal = sys.stderr.isatty()
        self.last_train = -math.inf

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") == "warning":
            self._write(Text(printable(f"warning: {event['message']}")))
            return
        if self.quiet and event.get("event") != "stopping":
            return
        if event.get("event") == "note":
            self._write(Text(f"note: {event['message']}"))
            return
        if event.get("event") == "train" and not self.terminal:
            now = time.monotonic()
            if now - self.last_train < PLAIN_INTERVAL_S and event["step"] != self.steps:
                return
            self.last_train = now
        line = _describe(event)
        if line is not None:
            self._write(Text.from_markup(printable(line)))  # paths and names: shown, never obeyed

    def _write(self, text: Text) -> None:
        if self.terminal:
            stderr.print(text, soft_wrap=True)
        else:
            sys.stderr.write(text.plain + "\n")
            sys.stderr.flush()


def _validation_requested(ctx: typer.Context, val_every: int, val_fraction: float, valid_data: str | None) -> bool:
    """Whether the command line asks for validation: --valid-data, or --val-every / --val-fraction above 0 given.

    Without them a run too small to hold out one sequence trains unvalidated with a note instead of failing; the
    defaults (validate every 1000 steps on 1% of the documents) are not a request.
    """

    def given(name: str) -> bool:
        # Compared by name: Typer 0.12-0.2x ships click's ParameterSource either from click or from its own copy.
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return (
        valid_data is not None or (given("val_every") and val_every > 0) or (given("val_fraction") and val_fraction > 0)
    )


@handle_errors(
    on_interrupt="interrupted before training started; nothing was saved", on_memory="lower --micro-batch-size"
)
def finetune(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Checkpoint to start from (default: BD3-LM's block-1024 pretrain).")
    ] = _D.model,  # noqa: E501
    init: Annotated[
        str | None, typer.Option("--init", help="Build a fresh model from a preset (tiny, small) instead of --model.")
    ] = None,  # noqa: E501
    hidden_dim: Annotated[int | None, typer.Option("--hidden-dim", help="With --init: width.")] = None,
    n_blocks: Annotated[int | None, typer.Option("--n-blocks", help="With --init: layers.")] = None,
    n_heads: Annotated[int | None, typer.Option("--n-heads", help="With --init: attention heads.")] = None,
    cond_dim: Annotated[int | None, typer.Option("--cond-dim", help="With --init: adaLN conditioning width.")] = None,
    dropout: Annotated[float | None, typer.Option("--dropout", help="Override the model's dropout.")] = None,
    tokenizer: o.Tokenizer = None,
    data: Annotated[
        str, typer.Option("--data", help="Hugging Face dataset id or local .txt/.jsonl/.parquet files.")
    ] = _D.data,  # noqa: E501
    data_config: Annotated[str | None, typer.Option("--data-config", help="Dataset configuration name.")] = None,
    data_split: Annotated[str, typer.Option("--data-split", help="Dataset split.")] = _D.data_split,
    text_field: Annotated[str, typer.Option("--text-field", help="Column holding the text.")] = _D.text_field,
    txt_documents: Annotated[
        str, typer.Option("--txt-documents", help=".txt files: one document per line or per file.")
    ] = _D.txt_documents,  # noqa: E501
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            help="Documents held out for validation. Given (above 0), it requires validation: a held-out split "
            "shorter than one sequence is an error instead of a note.",
        ),
    ] = _D.val_fraction,
    valid_data: Annotated[
        str | None, typer.Option("--valid-data", help="Separate validation data (then nothing is held out of --data).")
    ] = None,
    mix: Annotated[
        str, typer.Option("--mix", help="Block sizes and weights, e.g. 4:0.9,1024:0.1 (16:1 = plain BD3-LM).")
    ] = _D.mix,  # noqa: E501
    steps: Annotated[int, typer.Option("--steps", help="Total optimizer steps.")] = _D.steps,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Global batch per optimizer step (all processes).")
    ] = _D.batch_size,  # noqa: E501
    micro_batch_size: Annotated[
        int | None,
        typer.Option(
            "--micro-batch-size",
            help="Rows per forward pass per process (default: the largest divisor of the per-process batch up to 16).",
        ),
    ] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = _D.lr,
    warmup: Annotated[int, typer.Option("--warmup", help="Linear warmup steps, then constant.")] = _D.warmup,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Sequence length (default: the model's).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints/, metrics.jsonl, final/.")] = Path(
        _D.out
    ),  # noqa: E501
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint interval (steps).")] = _D.save_every,
    keep_last: Annotated[int, typer.Option("--keep-last", help="Checkpoints to keep.")] = _D.keep_last,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out.")] = False,
    seed: o.Seed = 0,
    clip: Annotated[
        str,
        typer.Option(
            "--clip",
            help="Noise interval EPS_MIN,EPS_MAX, per block size (4=0.5,1;1024=0.001,1), or auto: search the "
            "lowest-variance interval per block size at each validation (BD3-LM's var_min). Above eps_min 0.5 the "
            "loss is unweighted, as in BD3-LM.",
        ),
    ] = "0.001,1.0",
    no_resample: Annotated[bool, typer.Option("--no-resample", help="Do not redraw blocks outside --clip.")] = False,
    ema: Annotated[float, typer.Option("--ema", help="EMA decay (exported weights are the EMA).")] = _D.ema,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Gradient-norm clip.")] = _D.grad_clip,
    val_every: Annotated[
        int,
        typer.Option(
            "--val-every",
            help="Validation interval (steps; 0 = only at the end). Given above 0, it requires validation: a "
            "held-out split shorter than one sequence is an error instead of a note.",
        ),
    ] = _D.val_every,
    val_batches: Annotated[
        int,
        typer.Option(
            "--val-batches",
            help="Validation batches of 16 held-out rows per evaluation, whatever --micro-batch-size or the number "
            "of processes (0 = no validation).",
        ),
    ] = _D.val_batches,
    log_every: Annotated[int, typer.Option("--log-every", help="Logging interval (steps).")] = _D.log_every,
    mixed_precision: Annotated[
        str, typer.Option("--mixed-precision", help="auto (bf16 on GPU), no, bf16 or fp16.")
    ] = "auto",  # noqa: E501
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Where tokenised corpora are cached.")] = None,
    num_proc: Annotated[int | None, typer.Option("--num-proc", help="Processes for tokenisation.")] = None,
    report_to: Annotated[
        list[str] | None, typer.Option("--report-to", help="accelerate tracker (tensorboard, wandb, ...).")
    ] = None,  # noqa: E501
    attn_backend: o.AttnBackend = "auto",
    compile: o.Compile = False,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute block activations in backward (less memory).")
    ] = False,
    quiet: o.Quiet = False,
    allow_settings_change: Annotated[
        bool,
        typer.Option(
            "--allow-settings-change", help="With --resume: continue although settings differ from the checkpoint's."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier run's outputs in --out (a fresh run).")
    ] = False,
    push_to_hub: Annotated[
        str | None, typer.Option("--push-to-hub", help="Upload final/ to this Hub repository (owner/name) at the end.")
    ] = None,
    hub_private: Annotated[
        bool, typer.Option("--hub-private", help="With --push-to-hub: create the repository private.")
    ] = False,
    hub_revision: Annotated[
        str | None, typer.Option("--hub-revision", help="With --push-to-hub: the branch to push to (default: main).")
    ] = None,
) -> None:
    """Fine-tune with the block-diffusion NELBO at block sizes drawn per step from --mix (mix-scale training)."""
    from did_cli.data import check_data_source
    from did_cli.training.loop import TrainingInterrupted
    from did_cli.training.loop import finetune as run_finetune

    check_push_options(push_to_hub, hub_private, hub_revision)  # no token or no Hub: fail now, not after training
    check_data_source(data, "--data")
    if valid_data is not None:
        check_data_source(valid_data, "--valid-data")
    for flag, folder in (("--out", out), ("--cache-dir", cache_dir)):
        if folder is not None and (not str(folder).strip() or folder == Path(".")):
            raise UsageError(f"{flag} needs a folder name (a run writes checkpoints/, final/ and metrics there)")
        if folder is not None and folder.exists() and not folder.is_dir():
            raise UsageError(f"{flag} {folder} is a file; pass a folder")

    overrides = {
        k: v
        for k, v in {
            "hidden_dim": hidden_dim,
            "n_blocks": n_blocks,
            "n_heads": n_heads,
            "cond_dim": cond_dim,
            "dropout": dropout,
        }.items()
        if v is not None
    }
    from did_cli.noise import parse_clip

    settings = FinetuneSettings(
        out=str(out),
        model=model,
        init=init,
        init_overrides=overrides,
        tokenizer=tokenizer,
        data=data,
        data_config=data_config,
        data_split=data_split,
        text_field=text_field,
        txt_documents=txt_documents,
        val_fraction=val_fraction,
        valid_data=valid_data,
        mix=mix,
        steps=steps,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        lr=lr,
        warmup=warmup,
        seq_len=seq_len,
        save_every=save_every,
        keep_last=keep_last,
        resume=resume,
        seed=seed,
        clip=parse_clip(clip),
        resample=not no_resample,
        ema=ema,
        grad_clip=grad_clip,
        val_every=val_every,
        val_batches=val_batches,
        log_every=log_every,
        mixed_precision=mixed_precision,
        cache_dir=str(cache_dir) if cache_dir else None,
        num_proc=num_proc,
        report_to=tuple(report_to or ()),
        attn_backend=attn_backend,
        compile=compile,
        gradient_checkpointing=gradient_checkpointing,
        require_validation=_validation_requested(ctx, val_every, val_fraction, valid_data),
    )
    try:
        result = run_finetune(
            settings,
            on_event=_Printer(quiet, steps),
            allow_settings_change=allow_settings_change,
            overwrite=overwrite,
        )
    except KeyboardInterrupt as exc:
        sys.stderr.write(printable(f"{exc if isinstance(exc, TrainingInterrupted) else 'interrupted'}") + "\n")
        raise typer.Exit(130) from None
    if push_to_hub is not None:
        push_final(result.final, push_to_hub, hub_private, hub_revision)
