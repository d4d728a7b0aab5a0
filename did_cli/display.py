"""What a sample looks like to a person: a confidence heat-map of its tokens for the terminal (rich) and for HTML.

Each generated token is coloured by its snapshot confidence (the probability the model gave it when it was
committed, updated by each refinement). For refined records the positions remasked by the last refinement are
underlined and every token that differs from the stage-1 draft is shown after its struck-through draft token,
so one view answers "what did refinement change, and how sure was the model?".

The colour scale is five bins of viridis (dark purple = low, teal = middle, yellow-green = high), each token's
text in black or white, whichever contrasts more. Viridis's lightness rises monotonically, so the order survives
colour-blindness and greyscale, and no bin is near white or near black, so every bin stands out on light and dark
terminals alike (a diverging scale such as RdYlBu has a near-white middle that vanishes on a light background).
Five bins rather than a continuous ramp, so the legend states exactly which range each colour means.

The bins adapt to the sample shown (`confidence_scale`): their edges are the quintiles of its generated tokens'
confidences, so each colour holds about a fifth of them and the map has contrast wherever the model's confidences
lie. Fixed steps of 0.2 put almost every token of a small model in the darkest bin (did-tiny's mean confidence is
about 0.2) and almost every token of a strong one in the brightest. The legend says which scale it is and gives each
colour's range, so a colour means a range within this sample, not across samples. A sample with fewer than five
distinct confidences keeps the fixed steps.

The prompt is marked: on a grey background in colour, between « and » without colour. A token holding a newline
shows it as ⏎ and the line break follows the whole token, so a token's draft, arrow and brackets stay on one line.

Everything here is pure: a Record and the text of each token id in, a rich renderable or an HTML string out.
Decoding token ids needs a tokenizer (`token_texts`), and reading files and printing are the CLI's job. Only
`did_cli.cli` imports this module.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.text import Text

from did_cli.printable import printable
from did_cli.records import Record

__all__ = [
    "BINS",
    "FIXED_SCALE",
    "PROMPT_COLORS",
    "ConfidenceScale",
    "SampleSummary",
    "TokenView",
    "confidence_bin",
    "confidence_scale",
    "line_breaks",
    "render_html",
    "render_sample",
    "summarize",
    "summary_line",
    "token_texts",
    "token_views",
    "visible",
]

# (upper edge, label, background, text colour); text colour picked for contrast against each background.
# Viridis at 0.1, 0.3, 0.5, 0.7 and 0.9.
BINS: tuple[tuple[float, str, str, str], ...] = (
    (0.2, "0–0.2", "#482475", "#ffffff"),
    (0.4, "0.2–0.4", "#355f8d", "#ffffff"),
    (0.6, "0.4–0.6", "#21918c", "#000000"),
    (0.8, "0.6–0.8", "#44bf70", "#000000"),
    (float("inf"), "0.8–1", "#bddf26", "#000000"),
)
# A neutral grey, apart from every bin's hue; black text on it.
PROMPT_COLORS = ("#c6c6c6", "#000000")
_PROMPT_STYLE = f"italic {PROMPT_COLORS[1]} on {PROMPT_COLORS[0]}"
_PROMPT_OPEN, _PROMPT_CLOSE = "«", "»"
_DRAFT_STYLE = "strike dim"
_ARROW = "→"  # between a changed token's draft and its new text, in every rendering
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
    """`text` on one line: control characters as visible pictures (`printable`: a newline is ⏎), "" shown as ∅.

    The line break of a newline is written after the whole token (see `line_breaks`), never inside its marks.
    """
    if not text:
        return _EMPTY
    return printable(text)


def line_breaks(view: TokenView) -> str:
    """The line breaks to write after a token so the sample keeps its layout: one per newline in its text."""
    return "\n" * view.text.count("\n")


@dataclass(frozen=True)
class ConfidenceScale:
    """Which confidences each colour of BINS stands for.

    Attributes:
        edges: the upper edges of every bin but the last, strictly ascending (a confidence below `edges[i]` and at or
            above the edge before it takes bin i; the last bin takes the rest).
        quantiles: whether the edges are quintiles of the shown sample's confidences (else fixed steps of 0.2).
    """

    edges: tuple[float, ...]
    quantiles: bool

    def bin(self, confidence: float) -> int:
        """Index into BINS of a confidence's colour (NaN takes the lowest)."""
        return confidence_bin(confidence, self.edges)

    def labels(self) -> list[str]:
        """Each bin's range as text ("0–0.041", ..., "0.43–1"): the fewest digits that tell every edge apart."""
        for digits in range(2, 8):
            shown = [_edge_text(edge, digits) for edge in self.edges]
            if len(set(shown)) == len(shown):
                break
        bounds = ["0", *shown, "1"]
        return [f"{low}–{high}" for low, high in zip(bounds, bounds[1:], strict=False)]

    def title(self) -> str:
        """What the legend calls the scale."""
        return "confidence quintiles of this sample" if self.quantiles else "confidence"


FIXED_SCALE = ConfidenceScale(tuple(upper for upper, *_ in BINS[:-1]), quantiles=False)


def confidence_bin(confidence: float, edges: Sequence[float] = FIXED_SCALE.edges) -> int:
    """Index into BINS of the colour for a confidence, by the bins' upper `edges` (default the fixed 0.2 steps).

    Values outside [0, 1] go to the end bins, NaN to the lowest.
    """
    if confidence != confidence:
        return 0
    return next((i for i, upper in enumerate(edges) if confidence < upper), len(edges))


def confidence_scale(confidences: Iterable[float]) -> ConfidenceScale:
    """The quintiles of `confidences` (a sample's generated positions) as bin edges, each bin about a fifth of them.

    Each edge is the confidence at rank k·n/5 (k = 1..4) of the sorted values; an edge that ties with the lowest value
    or the edge below is moved up to the next distinct value, so no bin is empty. Fewer than five distinct values (or
    ties that leave a bin empty) keep the fixed 0.2 steps.
    """
    values = sorted(c for c in confidences if c == c)
    distinct = sorted(set(values))
    if len(distinct) < len(BINS):
        return FIXED_SCALE
    edges: list[float] = []
    for k in range(1, len(BINS)):
        edge, below = values[k * len(values) // len(BINS)], edges[-1] if edges else distinct[0]
        if edge <= below:
            edge = next((v for v in distinct if v > below), math.inf)
        edges.append(edge)
    if edges[-1] > distinct[-1]:  # ties ran out of values above: a bin would be empty
        return FIXED_SCALE
    return ConfidenceScale(tuple(edges), quantiles=True)


def _edge_text(value: float, digits: int) -> str:
    # `digits` significant digits in plain notation (0.0099, 0.029, 0.14), never an exponent.
    if value <= 0 or not math.isfinite(value):
        return "0" if value <= 0 else "1"
    decimals = max(digits - 1 - math.floor(math.log10(value)), 1)
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".") if value < 1 else "1"


def _scale(record: Record) -> ConfidenceScale:
    """The colour scale of one record: quintiles of its generated positions' confidences."""
    return confidence_scale(float(c) for c in record.confidence[record.prompt_len :])


def _last_refine(record: Record) -> dict[str, Any] | None:
    """The last revision stage: a refinement (remasking) or an edit (in-place replacement)."""
    refines = [stage for stage in record.stages if stage.get("kind") in ("refine", "edit")]
    return refines[-1] if refines else None


def _remasked_positions(record: Record) -> set[int]:
    """The positions the last revision stage remasked, or replaced for an edit stage (both are marked alike)."""
    stage = _last_refine(record)
    if stage is None:
        return set()
    changed = stage.get("edited" if stage.get("kind") == "edit" else "remasked", [])
    return {p for p in changed if isinstance(p, int) and 0 <= p < len(record.tokens)}


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
        refinements=sum(s.get("kind") in ("refine", "edit") for s in record.stages),
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
    if stage.get("kind") == "edit":
        settings = f"edit, threshold {_field(stage.get('threshold', '?'))}, {_field(stage.get('passes', '?'))} pass(es)"
        verb = "replaced"
    else:
        remask, gamma, size = (_field(stage.get(key, "?")) for key in ("remask", "gamma", "block_size"))
        settings, verb = f"{remask}, γ={gamma}, B2={size}", "remasked"
    changed = "?" if summary.changed is None else summary.changed
    before = "(before not recorded)" if summary.mean_remasked_before is None else _fmt(summary.mean_remasked_before)
    plural = "refinement" if summary.refinements == 1 else "refinements"
    return (
        f"refined ({summary.refinements} {plural}): {changed} of {summary.generated} generated tokens differ from "
        f"the draft; {summary.remasked} {verb} by the last refinement ({settings}); mean confidence: {verb} "
        f"{before} → {_fmt(summary.mean_remasked)}, kept {_fmt(summary.mean_kept)}, all {_fmt(summary.mean_confidence)}"
    )


def _field(value: Any) -> str:
    # A record field as text on one line: an escape sequence in a model name must not reach the terminal.
    return visible(str(value))


def _header(record: Record) -> str:
    model = _field((record.model or {}).get("name", "unknown model"))
    generated = len(record.tokens) - record.prompt_len
    return (
        f"sample id {_field(record.id)} (seed {_field(record.seed)}) from {model}: {len(record.tokens)} tokens, "
        f"{record.prompt_len} prompt + {generated} generated"
    )


def _styled_token(view: TokenView, scale: ConfidenceScale) -> Text:
    piece = Text()
    if view.draft_text is not None:
        piece.append(visible(view.draft_text), style=_DRAFT_STYLE)
        piece.append(_ARROW, style="dim")
    if view.is_prompt:
        style = _PROMPT_STYLE
    else:
        _, _, background, foreground = BINS[scale.bin(view.confidence)]
        style = f"{foreground} on {background}" + (" underline" if view.remasked else "")
    piece.append(visible(view.text), style=style)
    piece.append(line_breaks(view))
    return piece


def _plain_token(view: TokenView) -> str:
    # Without colour, brackets and arrows carry what underline and strikethrough would.
    text = visible(view.text)
    if view.draft_text is not None:
        text = f"{visible(view.draft_text)}{_ARROW}{text}"
    return (f"[{text}]" if view.remasked else text) + line_breaks(view)


def _legend(refined: bool, styled: bool, scale: ConfidenceScale = FIXED_SCALE) -> Text:
    legend = Text("legend: ")
    if styled:
        legend.append(f"{scale.title()} ")
        for label, (_, _, background, foreground) in zip(scale.labels(), BINS, strict=True):
            legend.append(f" {label} ", style=f"{foreground} on {background}")
        legend.append("  ")
        legend.append(" prompt ", style=_PROMPT_STYLE)
        if refined:
            _, _, background, foreground = BINS[-1]
            legend.append("  ")
            legend.append("remasked by the last refinement", style="underline")
            legend.append("  changed from the draft: ")
            legend.append("old", style=_DRAFT_STYLE)
            legend.append(_ARROW, style="dim")
            legend.append("new", style=f"{foreground} on {background}")
            legend.append(" (struck through: the draft's token)")
        return legend
    legend.append("no colour here, so confidence is not shown (use a colour terminal or --html); ")
    legend.append(f"{_PROMPT_OPEN}prompt{_PROMPT_CLOSE}")
    if refined:
        legend.append("; [token] remasked by the last refinement; old→new token changed from the draft")
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
    scale = _scale(record)
    body = Text()
    for view in views:
        if not styled and view.position == 0 and view.is_prompt:
            body.append(_PROMPT_OPEN)
        body.append_text(_styled_token(view, scale) if styled else Text(_plain_token(view)))
        if not styled and view.is_prompt and view.position == record.prompt_len - 1:
            body.append(_PROMPT_CLOSE)
    refined = _last_refine(record) is not None
    return Group(
        Text(_header(record), style="bold" if styled else ""),
        body,
        _legend(refined, styled, scale),
        Text(summary_line(summarize(record))),
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222; }
h1 { font-size: 1.2em; }
.sample { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap;
  word-break: break-word; line-height: 1.9; border: 1px solid #ddd; padding: 1em; }
.tok { border-radius: 2px; }
.prompt { background: #c6c6c6; color: #000000; font-style: italic; }
.remasked { text-decoration: underline; text-decoration-thickness: 2px; text-underline-offset: 3px; }
del.draft { color: #666; }
.arrow { color: #666; }
.legend span { padding: 0 0.4em; font-family: ui-monospace, monospace; }
.legend .item, .legend .arrow { padding: 0; }
.legend .item { margin-right: 1em; }
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


def _html_token(view: TokenView, scale: ConfidenceScale) -> str:
    # The colour sits on the current text alone, so a struck-through draft token stays grey on the page background.
    colour = "prompt" if view.is_prompt else f"c{scale.bin(view.confidence)}"
    classes = "tok remasked" if view.remasked else "tok"
    draft = ""
    if view.draft_text is not None:
        draft = f'<del class="draft">{html.escape(visible(view.draft_text))}</del><span class="arrow">{_ARROW}</span>'
    title = html.escape(_tooltip(view), quote=True)
    text = f'<span class="{colour}">{html.escape(visible(view.text))}</span>'
    return f'<span class="{classes}" title="{title}">{draft}{text}</span>{line_breaks(view)}'


def _html_legend(refined: bool, scale: ConfidenceScale) -> str:
    bins = "".join(f'<span class="c{i}">{html.escape(label)}</span>' for i, label in enumerate(scale.labels()))
    items = [f'<span class="item">{html.escape(scale.title())} {bins}</span>', '<span class="prompt">prompt</span>']
    if refined:
        items.append('<span class="remasked">remasked by the last refinement</span>')
        items.append(
            '<span class="item">changed from the draft: <del class="draft">old</del>'
            f'<span class="arrow">{_ARROW}</span><span class="c{len(BINS) - 1}">new</span>'
            " (struck through: the draft's token)</span>"
        )
    return f'<p class="legend">{" ".join(items)} (hover a token for its details)</p>'


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
    scale = _scale(record)
    header = html.escape(_header(record))
    tokens = "".join(_html_token(view, scale) for view in views)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>did sample {html.escape(str(record.id))}</title>\n"
        f"<style>\n{_CSS}\n{_bin_css()}\n</style>\n</head>\n<body>\n"
        f"<h1>{header}</h1>\n"
        f'<p class="summary">{html.escape(summary_line(summarize(record)))}</p>\n'
        f"{_html_legend(_last_refine(record) is not None, scale)}\n"
        f'<div class="sample">{tokens}</div>\n'
        "</body>\n</html>\n"
    )
