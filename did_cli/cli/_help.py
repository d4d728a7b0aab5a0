"""How `--help` shows each command's flags and arguments: what a flag takes, in words a user reads.

Typer writes a flag's type beside it, and its defaults leak Python: a switch shows `<bool>` as if it took a value
(`--resume <bool>`), a repeatable option its annotation (`--model <list[str]>`), and the usage line puts a required
argument in braces (`did show [OPTIONS] {file}`). The app registers every command with `Command` (and the root with
`Group`), which fixes these in one place for every flag, the ones declared inline included:

* a switch (a boolean flag, `--help` too) shows no value;
* a repeatable option shows the value it takes once (`--model <str>`; the help says it may be repeated);
* an argument is named in capitals, as a placeholder (`FILE`, `[INPUT]`, `FILES...`), in the usage line and its row;
* help text is shown as written: Typer reads it as rich markup, which swallowed a bracketed `[default: did-tiny]`
  (so `--order`'s default showed only where Typer wrote it itself, in `did sweep --help`).

Only click's public attributes (`metavar`, `help`, `is_flag`, `multiple`, `nargs`, `required`) are read and set, and
Typer's own type text is rewritten rather than rebuilt, so a Typer release that renders otherwise keeps its own text.
"""

from __future__ import annotations

import re
from typing import Any

from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

__all__ = ["Command", "Group"]

_LIST = re.compile(r"list\[(\w+)\]")


def _shown_type(param: Any, ctx: Any) -> str | None:
    """Typer's type text for `param` with a `list[X]` annotation shown as the X it takes (None: Typer shows none)."""
    render = getattr(type(param), "display_type_rich", None)
    if render is None:  # a Typer before its typed help: nothing to rewrite
        return None
    shown = render(param, ctx)
    return None if shown is None else _LIST.sub(lambda match: match.group(1).lower(), shown)


def _tidy(param: Any, ctx: Any, markup: bool) -> None:
    """Set the placeholder `--help` shows for one parameter and escape its help if read as `markup`, once."""
    if getattr(param, "_did_help", False):
        return
    param._did_help = True
    if markup and getattr(param, "help", None):
        param.help = escape(param.help)
    if getattr(param, "param_type_name", None) == "argument":
        if param.metavar is None:
            param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
        shown = _shown_type(param, ctx)
        if shown is not None:
            param.display_type_rich = lambda ctx, shown=shown: shown  # this argument's type text, listless
        return
    if getattr(param, "is_flag", False):
        param.metavar = ""  # a switch takes no value
    elif getattr(param, "multiple", False) and param.metavar is None:
        param.metavar = _shown_type(param, ctx)


class Command(TyperCommand):
    """A did command: its `--help` shows what each flag takes (see the module docstring)."""

    def get_params(self, ctx: Any) -> list[Any]:
        """The parameters, `--help` included, each with the placeholder its help shows."""
        params = super().get_params(ctx)
        for param in params:
            _tidy(param, ctx, getattr(self, "rich_markup_mode", None) == "rich")
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """`[OPTIONS]` and each argument's placeholder: required as is, optional in brackets (`did refine [INPUT]`)."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces


class Group(TyperGroup):
    """The `did` group: its own flags (`--version`, `--help`) shown as switches."""

    def get_params(self, ctx: Any) -> list[Any]:
        """The group's parameters, each with the placeholder its help shows."""
        params = super().get_params(ctx)
        for param in params:
            _tidy(param, ctx, getattr(self, "rich_markup_mode", None) == "rich")
        return params
