"""The `did` command: a Typer app whose commands are thin layers over `did_cli.api`.

`main` is the one place that sees every exit: a Ctrl-C at any moment (even while torch is still importing) ends
with status 130 and one line, a closed stdout (`did --help | head -1`) ends quietly with status 0.
"""

from __future__ import annotations

import os
import sys

import typer

from did_cli.cli._errors import handle_errors, interrupted, say_line, silence_stdout
from did_cli.cli._help import Command, Group

__all__ = ["app", "build_app", "handle_errors", "main"]


def _version(value: bool) -> None:
    if value:
        from did_cli.provenance import package_version

        typer.echo(f"did {package_version('did')}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Diffusion in Diffusion: draft fast with small blocks and a KV cache, then globally revise weak tokens."""


def build_app() -> typer.Typer:
    """The Typer app with every command registered (importing the command modules, which import no torch)."""
    from did_cli.cli.draft import draft
    from did_cli.cli.eval_nll import eval_nll
    from did_cli.cli.eval_ppl import eval_ppl
    from did_cli.cli.finetune import finetune
    from did_cli.cli.generate import generate
    from did_cli.cli.push import push
    from did_cli.cli.refine import refine
    from did_cli.cli.show import show
    from did_cli.cli.sweep import sweep

    application = typer.Typer(
        name="did",
        cls=Group,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    application.callback()(_root)
    commands = [
        ("draft", draft, "Draft samples block by block with the KV cache, recording snapshot confidence (JSONL)."),
        ("refine", refine, "Remask the least confident tokens of drafts and re-denoise them globally (JSONL)."),
        ("generate", generate, "Draft then refine in one process (same records as draft | refine)."),
        ("finetune", finetune, "Mix-scale block-diffusion fine-tuning on accelerate (block size drawn per step)."),
        ("show", show, "Show one sample as a confidence heat-map, marking what refinement changed; --text: the texts."),
        ("eval-ppl", eval_ppl, "Gen PPL and entropy of sample files under a judge LM (BD3-LM protocol)."),
        ("eval-nll", eval_nll, "NELBO per token and its perplexity bound per model and block size (test PPL)."),
        ("sweep", sweep, "Run the paper's ablations (remask strategy, gamma, B2, NFEs) and write a report."),
        ("push", push, "Upload a checkpoint folder to the Hugging Face Hub with a model card from the run's files."),
    ]
    for name, function, help_text in commands:
        application.command(name, help=help_text, cls=Command)(function)  # Command: what --help shows per flag
    return application


def __getattr__(name: str) -> typer.Typer:
    # `app` is built on first use, inside main's handlers when run as a command, so a Ctrl-C while the command
    # modules import is handled like any other.
    if name == "app":
        application = build_app()
        globals()["app"] = application
        return application
    raise AttributeError(f"module 'did_cli.cli' has no attribute {name!r}")


def main() -> None:
    """Console-script entry point."""
    stdout_was = _stdout_identity()
    try:
        result = __getattr__("app")(standalone_mode=False)
    except KeyboardInterrupt:
        interrupted()
        sys.exit(130)
    except BrokenPipeError:
        silence_stdout()
        sys.exit(0)
    except SystemExit as exc:
        # click and rich turn a closed stdout during their own output (`did --help | head -1`) into status 1, rich
        # after pointing stdout at /dev/null: a stdout that changed under us means the reader went away.
        if exc.code == 1 and stdout_was is not None and _stdout_identity() != stdout_was:
            sys.exit(0)
        raise
    except Exception as exc:
        _exit_on_usage_error(exc)
        raise
    sys.exit(result if isinstance(result, int) else 0)


def _is_a(exc: BaseException, name: str) -> bool:
    # By class name: Typer vendors click, and its exception classes are not public API.
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def _exit_on_usage_error(exc: Exception) -> None:
    """A bad flag or value as one line (click prints a boxed usage message); Ctrl-C during parsing as 130."""
    if _is_a(exc, "Abort"):
        interrupted()
        sys.exit(130)
    if _is_a(exc, "NoArgsIsHelpError"):
        exc.show()  # type: ignore[attr-defined] - `did` alone prints the help, as before
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    if _is_a(exc, "ClickException"):
        context = getattr(exc, "ctx", None)
        path = f"{context.command_path} --help" if context is not None else "did --help"
        message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
        say_line(f"error: {message} (see '{path}')")  # the value the user typed is shown, never obeyed
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]


def _stdout_identity() -> tuple[int, int] | None:
    try:
        info = os.fstat(1)
    except OSError:
        return None
    return info.st_dev, info.st_ino
