"""`did finetune --push-to-hub`: its options checked before training, and the push of `final/` when the run ends."""

from __future__ import annotations

from pathlib import Path

from did_cli.cli._progress import say
from did_cli.errors import DidError, UsageError

__all__ = ["check_push_options", "push_final"]


def check_push_options(repo_id: str | None, private: bool, revision: str | None) -> None:
    """Refuse hub options without --push-to-hub; with it, fail now (no token, offline) rather than after training.

    Raises:
        UsageError: --hub-private or --hub-revision without --push-to-hub, or a malformed repository id.
        HubError: no token or no reachable Hub.
    """
    if repo_id is None:
        if private or revision is not None:
            raise UsageError("--hub-private and --hub-revision need --push-to-hub REPO_ID")
        return
    from did_cli.hub import check_push

    check_push(repo_id)


def push_final(final: Path, repo_id: str, private: bool, revision: str | None) -> None:
    """Upload the run's `final/` (main process only) and say where it went, in one line on stderr."""
    from did_cli.hub import push_folder
    from did_cli.processes import launch

    if not launch().is_main:
        return
    try:
        result = push_folder(final, repo_id, private=private, revision=revision)
    except DidError as exc:
        raise type(exc)(f"the run finished and {final} is saved, but pushing it failed: {exc}") from None
    say(result.describe())
