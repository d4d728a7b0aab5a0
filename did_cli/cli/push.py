"""`did push`: upload a did checkpoint folder to a Hugging Face Hub model repository, with its model card.

A thin layer over `did_cli.hub.push_folder`. The card (README.md) is rewritten first from the folder's files, its
run's settings.json and summary.json (for a run's `final/`) and the `--eval-nll` / `--eval-ppl` outputs named; then
the folder goes up in one commit. stdout stays empty: notes and the line saying where the folder went are on stderr.
Without a token or a reachable Hub the command fails in one line before writing anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from did_cli.cli._errors import handle_errors
from did_cli.cli._progress import say

Folder = Annotated[Path, typer.Argument(help="The checkpoint folder (config.json, model.safetensors), e.g. OUT/final.")]
RepoId = Annotated[str, typer.Argument(help="The Hub model repository, owner/name; created when it does not exist.")]
EvalFiles = list[Path] | None


@handle_errors
def push(
    folder: Folder,
    repo_id: RepoId,
    private: Annotated[
        bool, typer.Option("--private", help="Create the repository private (an existing public one is refused).")
    ] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to push to (default: main), created from main when new.")
    ] = None,
    eval_nll: Annotated[
        EvalFiles,
        typer.Option("--eval-nll", help="A `did eval-nll --json` file for the card (rows of these weights); repeat."),
    ] = None,
    eval_ppl: Annotated[
        EvalFiles,
        typer.Option(
            "--eval-ppl", help="A `did eval-ppl --json` file for the card (samples made with these weights); repeat."
        ),
    ] = None,
    license_id: Annotated[
        str | None, typer.Option("--license", help="License id for the card's metadata, e.g. apache-2.0.")
    ] = None,
    message: Annotated[str | None, typer.Option("--message", help="Commit message.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Write the card and list what would go up; contact no Hub.")
    ] = False,
) -> None:
    """Push a checkpoint folder to the Hub with a model card whose numbers come from the run's files."""
    from did_cli.hub import files_to_upload, push_folder, write_card

    evals = {"eval_nll": eval_nll or [], "eval_ppl": eval_ppl or [], "license_id": license_id}
    if dry_run:
        card = write_card(folder, repo_id=repo_id, **evals)
        _notes(card.skipped)
        say(f"wrote {folder / 'README.md'}; would push to {repo_id}: {', '.join(files_to_upload(folder))}")
        return
    result = push_folder(folder, repo_id, private=private, revision=revision, commit_message=message, **evals)
    _notes(result.skipped)
    say(result.describe())


def _notes(skipped: tuple[str, ...]) -> None:
    for entry in skipped:
        say(f"note: left out of the card: {entry}")
