"""`did finetune`: mix-scale block-diffusion fine-tuning (or pretraining) on accelerate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._run import stderr
from did_cli.config import FinetuneSettings
from did_cli.noise import parse_clip

_D = FinetuneSettings()


def _print_event(event: dict[str, Any]) -> None:
    kind = event.get("event")
    if kind == "train":
        by_size = " ".join(f"B{k}={v:.3f}" for k, v in event["loss_by_block_size"].items())
        stderr.print(
            f"step {event['step']:>7}  loss {event['loss']:.4f}  [{by_size}]  lr {event['lr']:.2e}  "
            f"{event['tokens_per_s']:,.0f} tok/s  eta {event['eta_s'] / 60:.1f} min",
            soft_wrap=True,
        )
    elif kind == "validation":
        values = " ".join(f"B{k}={v:.4f}" for k, v in event["nelbo"].items())
        stderr.print(f"[bold]validation[/] step {event['step']}  NELBO/token {values}")
    elif kind == "checkpoint":
        stderr.print(f"[dim]saved {event['path']}[/]")
    elif kind in ("resume", "fresh"):
        stderr.print(f"[dim]{event.get('checkpoint') and 'resumed from ' + event['checkpoint'] or event['reason']}[/]")
    elif kind == "done":
        stderr.print(f"[bold green]done[/]: {event['steps']} steps, exported EMA weights to {event['final']}")


@handle_errors(on_interrupt="interrupted: continue from the last checkpoint with --resume")
def finetune(
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
        float, typer.Option("--val-fraction", help="Documents held out for validation.")
    ] = _D.val_fraction,  # noqa: E501
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
        int, typer.Option("--micro-batch-size", help="Rows per forward pass per process.")
    ] = _D.micro_batch_size,  # noqa: E501
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
        typer.Option("--clip", help="Noise interval EPS_MIN,EPS_MAX, or per block size: 4=0.5,1;1024=0.001,1."),
    ] = "0.001,1.0",
    no_resample: Annotated[bool, typer.Option("--no-resample", help="Do not redraw blocks outside --clip.")] = False,
    ema: Annotated[float, typer.Option("--ema", help="EMA decay (exported weights are the EMA).")] = _D.ema,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Gradient-norm clip.")] = _D.grad_clip,
    val_every: Annotated[
        int, typer.Option("--val-every", help="Validation interval (steps; 0 = only at the end).")
    ] = _D.val_every,  # noqa: E501
    val_batches: Annotated[
        int, typer.Option("--val-batches", help="Validation batches per evaluation.")
    ] = _D.val_batches,  # noqa: E501
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
) -> None:
    """Fine-tune with the block-diffusion NELBO at block sizes drawn per step from --mix (mix-scale training)."""
    from did_cli.training.loop import finetune as run_finetune

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
    )
    run_finetune(settings, on_event=None if quiet else _print_event)
