"""What a sample looks like to a person: a confidence heat-map of its tokens for the terminal (rich) and for HTML.

Each generated token is coloured by its snapshot confidence (the probability the model gave it when it was
committed, updated by each refinement). For refined records the positions remasked by the last refinement are
underlined and every token that differs from the stage-1 draft is shown after its struck-through draft token,
so one view answers "what did refinement change, and how sure was the model?".

The colour scale is ColorBrewer's 5-class RdYlBu (red = low, yellow = middle, blue = high): its lightness is
ordered and it stays readable for red-green colour-blind readers, which a red-to-green scale is not. Five bins
rather than a continuous ramp, so the legend states exactly which range each colour means.

Everything here is pure: a Record and the text of each token id in, a rich renderable or an HTML string out.
Decoding token ids needs a tokenizer (`token_texts`), and reading files and printing are the CLI's job. Only
`did_cli.cli` imports this module.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.text import Text

from did_cli.records import Record

__all__ = [
    "BINS",
    "SampleSummary",
    "TokenView",
    "confidence_bin",
    "render_html",
    "render_sample",
    "summarize",
    "summary_line",
    "token_texts",
    "token_views",
    "visible",
]

# (upper edge, label, background, text colour); text colour picked for contrast against each background.
BINS: tuple[tuple[float, str, str, str], ...] = (
    (0.2, "0–0.2", "#d7191c", "#ffffff"),
    (0.4, "0.2–0.4", "#fdae61", "#000000"),
    (0.6, "0.4–0.6", "#ffffbf", "#000000"),
    (0.8, "0.6–0.8", "#abd9e9", "#000000"),
    (float("inf"), "0.8–1", "#2c7bb6", "#ffffff"),
)
_PROMPT_STYLE = "dim"
_DRAFT_STYLE = "strike dim"
# Control characters would move the cursor or vanish; Unicode's "control pictures" show them instead. A newline
# keeps its line break after the picture so the sample keeps its layout.
_CONTROL = {"\n": "↵\n", "\t": "⇥", **{chr(c): chr(0x2400 + c) for c in range(32) if chr(c) not in "\n\t"}}
_CONTROL["\x7f"] = "␡"
_EMPTY = "∅"


@dataclass(frozen=True)
class TokenView:
    """One position of a sample, as it is displayed.

    Attributes:
        position: index in the whole sequence (prompt included).
        text: the decoded current token.
        confidence: its stored confidence (1.0 at prompt positions).
        is_prompt: whether the position is part of the prompt (never sampled, so never coloured).
        remasked: whether the last refinement remasked this position.
        draft_text: the decoded stage-1 draft token when it differs from the current one, else None.
    """

    position: int
    text: str
    confidence: float
    is_prompt: bool
    remasked: bool
    draft_text: str | None


@dataclass(frozen=True)
class SampleSummary:
    """The numbers in a sample's one-line summary, all over generated positions (the prompt excluded).

    Refine stages record `previous_confidence` (the confidence each remasked position held before the stage), so
    the remasked positions' mean before and after the last refinement can be compared; records written before that
    field existed only support the after value.

    Attributes:
        generated: number of generated positions.
        refinements: number of refine stages the record went through.
        changed: generated positions whose token differs from the draft (None when the record has no draft).
        remasked: positions remasked by the last refinement (None for a draft).
        mean_confidence: mean over all generated positions (None when nothing was generated).
        mean_remasked: mean over the last refinement's remasked positions, after it (None if there are none).
        mean_remasked_before: the same positions' mean before the last refinement (None when not recorded).
        mean_kept: mean over generated positions the last refinement kept (None if there are none).
        last_refine: the last refine stage's settings, or None for a draft.
    """

    generated: int
    refinements: int
    changed: int | None
    remasked: int | None
    mean_confidence: float | None
    mean_remasked: float | None
    mean_kept: float | None
    last_refine: dict[str, Any] | None
    mean_remasked_before: float | None = None


def token_texts(tokenizer: Any, ids: Iterable[int]) -> dict[int, str]:
    """The text of each token id, decoded one token at a time.

    A byte-level tokenizer (GPT-2) may split one UTF-8 character over two tokens; decoded alone each shows as
    U+FFFD. That is what the token is, so it is shown rather than hidden by merging tokens.
    """
    return {i: tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in set(ids)}


def visible(text: str) -> str:
    """`text` with control characters made visible (newlines keep their line break) and "" shown as ∅."""
    if not text:
        return _EMPTY
    return "".join(_CONTROL.get(c, c) for c in text)


def confidence_bin(confidence: float) -> int:
    """Index into BINS of the colour for a confidence (values outside [0, 1] go to the end bins, NaN to the lowest)."""
    if confidence != confidence:
        return 0
    return next(i for i, (upper, *_) in enumerate(BINS) if confidence < upper)


def _last_refine(record: Record) -> dict[str, Any] | None:
    refines = [stage for stage in record.stages if stage.get("kind") == "refine"]
    return refines[-1] if refines else None


def _remasked_positions(record: Record) -> set[int]:
    stage = _last_refine(record)
    if stage is None:
        return set()
    return {p for p in stage.get("remasked", []) if 0 <= p < len(record.tokens)}


def token_views(record: Record, texts: Mapping[int, str]) -> list[TokenView]:
    """One TokenView per position of `record`; `texts` maps every id in tokens and draft_tokens to its text."""
    remasked = _remasked_positions(record)
    draft = record.draft_tokens or record.tokens
    return [
        TokenView(
            position=i,
            text=texts[token],
            confidence=float(record.confidence[i]),
            is_prompt=i < record.prompt_len,
            remasked=i in remasked,
            draft_text=texts[draft[i]] if draft[i] != token else None,
        )
        for i, token in enumerate(record.tokens)
    ]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(record: Record) -> SampleSummary:
    """The counts and mean confidences of `record`'s generated positions (see SampleSummary for definitions)."""
    generated = range(record.prompt_len, len(record.tokens))
    stage = _last_refine(record)
    remasked = _remasked_positions(record)
    draft = record.draft_tokens
    changed = sum(draft[i] != record.tokens[i] for i in generated) if draft is not None else None
    conf = record.confidence
    return SampleSummary(
        generated=len(generated),
        refinements=sum(s.get("kind") == "refine" for s in record.stages),
        changed=changed,
        remasked=len(remasked) if stage is not None else None,
        mean_confidence=_mean([conf[i] for i in generated]),
        mean_remasked=_mean([conf[i] for i in generated if i in remasked]) if stage is not None else None,
        mean_kept=_mean([conf[i] for i in generated if i not in remasked]) if stage is not None else None,
        last_refine=stage,
        mean_remasked_before=_mean(list(stage.get("previous_confidence") or [])) if stage is not None else None,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_line(summary: SampleSummary) -> str:
    """One line: what changed against the draft and the mean confidences (see SampleSummary for their meaning)."""
    if summary.last_refine is None:
        return f"draft: {summary.generated} generated tokens; mean confidence {_fmt(summary.mean_confidence)}"
    stage = summary.last_refine
    settings = f"{stage.get('remask', '?')}, γ={stage.get('gamma', '?')}, B2={stage.get('block_size', '?')}"
    changed = "?" if summary.changed is None else summary.changed
    before = "(before not recorded)" if summary.mean_remasked_before is None else _fmt(summary.mean_remasked_before)
    plural = "refinement" if summary.refinements == 1 else "refinements"
    return (
        f"refined ({summary.refinements} {plural}): {changed} of {summary.generated} generated tokens differ from "
        f"the draft; {summary.remasked} remasked by the last refinement ({settings}); mean confidence: remasked "
        f"{before} → {_fmt(summary.mean_remasked)}, kept {_fmt(summary.mean_kept)}, all {_fmt(summary.mean_confidence)}"
    )


def _header(record: Record) -> str:
    model = (record.model or {}).get("name", "unknown model")
    generated = len(record.tokens) - record.prompt_len
    return (
        f"sample id {record.id} (seed {record.seed}) from {model}: {len(record.tokens)} tokens, "
        f"{record.prompt_len} prompt + {generated} generated"
    )


def _styled_token(view: TokenView) -> Text:
    piece = Text()
    if view.draft_text is not None:
        piece.append(visible(view.draft_text), style=_DRAFT_STYLE)
    if view.is_prompt:
        style = _PROMPT_STYLE
    else:
        _, _, background, foreground = BINS[confidence_bin(view.confidence)]
        style = f"{foreground} on {background}" + (" underline" if view.remasked else "")
    piece.append(visible(view.text), style=style)
    return piece


def _plain_token(view: TokenView) -> str:
    # Without colour, brackets and arrows carry what underline and strikethrough would.
    text = visible(view.text)
    if view.draft_text is not None:
        text = f"{visible(view.draft_text)}→{text}"
    return f"[{text}]" if view.remasked else text


def _legend(refined: bool, styled: bool) -> Text:
    legend = Text("legend: ")
    if styled:
        legend.append("confidence ")
        for _, label, background, foreground in BINS:
            legend.append(f" {label} ", style=f"{foreground} on {background}")
        legend.append("  ")
        legend.append("prompt", style=_PROMPT_STYLE)
        if refined:
            legend.append("  ")
            legend.append("remasked by the last refinement", style="underline")
            legend.append("  ")
            legend.append("draft", style=_DRAFT_STYLE)
            legend.append("new = token changed from the draft")
        return legend
    legend.append("no colour here, so confidence is not shown (use a colour terminal or --html)")
    if refined:
        legend.append("; [token] remasked by the last refinement; draft→new token changed from the draft")
    return legend


def render_sample(record: Record, texts: Mapping[int, str], *, styled: bool = True) -> Group:
    """A rich renderable of one sample: header, the tokens, a legend and the one-line summary.

    Args:
        record: the sample.
        texts: the text of every id in `record.tokens` and `record.draft_tokens` (see `token_texts`).
        styled: colours, underline and strikethrough; False writes brackets and arrows instead, for output
            that is not a colour terminal (a file, a pipe, NO_COLOR).

    Returns:
        A rich Group of four Text lines; token text is never parsed as rich markup.
    """
    views = token_views(record, texts)
    body = Text()
    for view in views:
        body.append_text(_styled_token(view) if styled else Text(_plain_token(view)))
    refined = _last_refine(record) is not None
    return Group(
        Text(_header(record), style="bold" if styled else ""),
        body,
        _legend(refined, styled),
        Text(summary_line(summarize(record))),
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222; }
h1 { font-size: 1.2em; }
.sample { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap;
  word-break: break-word; line-height: 1.9; border: 1px solid #ddd; padding: 1em; }
.tok { border-radius: 2px; }
.prompt { color: #888; }
.remasked { text-decoration: underline; text-decoration-thickness: 2px; text-underline-offset: 3px; }
del.draft { color: #888; margin-right: 1px; }
.legend span { padding: 0 0.4em; margin-right: 0.3em; font-family: ui-monospace, monospace; }
""".strip()


def _bin_css() -> str:
    return "\n".join(f".c{i} {{ background: {bg}; color: {fg}; }}" for i, (_, _, bg, fg) in enumerate(BINS))


def _tooltip(view: TokenView) -> str:
    parts = [f"#{view.position} token {view.text!r}", f"confidence {view.confidence:.4f}"]
    if view.is_prompt:
        parts.append("prompt")
    parts.append(f"draft {view.draft_text!r}" if view.draft_text is not None else "draft: same token")
    if view.remasked:
        parts.append("remasked by the last refinement")
    return " · ".join(parts)


def _html_token(view: TokenView) -> str:
    classes = ["tok", "prompt" if view.is_prompt else f"c{confidence_bin(view.confidence)}"]
    if view.remasked:
        classes.append("remasked")
    draft = f'<del class="draft">{html.escape(visible(view.draft_text))}</del>' if view.draft_text is not None else ""
    title = html.escape(_tooltip(view), quote=True)
    return f'<span class="{" ".join(classes)}" title="{title}">{draft}{html.escape(visible(view.text))}</span>'


def _html_legend(refined: bool) -> str:
    items = [f'<span class="c{i}">{label}</span>' for i, (_, label, _, _) in enumerate(BINS)]
    items.append('<span class="prompt">prompt</span>')
    if refined:
        items.append('<span class="remasked">remasked by the last refinement</span>')
        items.append('<span><del class="draft">draft</del>new = token changed from the draft</span>')
    return f'<p class="legend">confidence: {"".join(items)} (hover a token for its details)</p>'


def render_html(record: Record, texts: Mapping[int, str]) -> str:
    """A standalone HTML page of one sample: inline CSS, no scripts, nothing fetched from the network.

    Every token is a span whose title (shown on hover) gives its text, confidence and draft token; all record
    text is HTML-escaped, so a token such as "<b>&" shows literally.

    Args:
        record: the sample.
        texts: the text of every id in `record.tokens` and `record.draft_tokens` (see `token_texts`).

    Returns:
        The page, a complete HTML5 document.
    """
    views = token_views(record, texts)
    header = html.escape(_header(record))
    tokens = "".join(_html_token(view) for view in views)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>did sample {record.id}</title>\n"
        f"<style>\n{_CSS}\n{_bin_css()}\n</style>\n</head>\n<body>\n"
        f"<h1>{header}</h1>\n"
        f'<p class="summary">{html.escape(summary_line(summarize(record)))}</p>\n'
        f"{_html_legend(_last_refine(record) is not None)}\n"
        f'<div class="sample">{tokens}</div>\n'
        "</body>\n</html>\n"
    )
