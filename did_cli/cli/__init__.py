"""The `did` command: a Typer app whose commands are thin layers over `did_cli.api`."""

from __future__ import annotations

import typer

from did_cli.cli.draft import draft
from did_cli.cli.generate import generate
from did_cli.cli.refine import refine

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


def main() -> None:
    """Console-script entry point."""
    app()
