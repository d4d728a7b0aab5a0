"""The `did` command: a Typer app whose commands are thin layers over `did_cli.api`."""

from __future__ import annotations

import typer

from did_cli.cli.draft import draft
from did_cli.cli.eval_nll import eval_nll
from did_cli.cli.eval_ppl import eval_ppl
from did_cli.cli.finetune import finetune
from did_cli.cli.generate import generate
from did_cli.cli.refine import refine
from did_cli.cli.show import show
from did_cli.cli.sweep import sweep

app = typer.Typer(
    name="did",
    help="Diffusion in Diffusion: draft fast with small blocks and a KV cache, then globally revise weak tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("draft", help="Draft samples block by block with the KV cache, recording snapshot confidence (JSONL).")(
    draft
)
app.command("refine", help="Remask the least confident tokens of drafts and re-denoise them globally (JSONL).")(refine)
app.command("generate", help="Draft then refine in one process (same records as draft | refine).")(generate)
app.command("finetune", help="Mix-scale block-diffusion fine-tuning on accelerate (block size drawn per step).")(
    finetune
)
app.command("show", help="Show one sample as a confidence heat-map, marking what refinement changed.")(show)
app.command("eval-ppl", help="Gen PPL and entropy of sample files under a judge LM (BD3-LM protocol).")(eval_ppl)
app.command("eval-nll", help="NELBO per token and its perplexity bound per model and block size (test PPL).")(eval_nll)
app.command("sweep", help="Run the paper's ablations (remask strategy, gamma, B2, NFEs) and write a report.")(sweep)


def main() -> None:
    """Console-script entry point."""
    app()
