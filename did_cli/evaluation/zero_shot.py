"""The zero-shot likelihood sets BD3-LM reports (PTB, WikiText, LM1B, LAMBADA, AG News, PubMed, arXiv) as presets.

Each preset names the Hugging Face dataset, configuration, split and text column BD3-LM's `dataloader.py` reads, and
the detokeniser it applies before GPT-2 tokenisation: these corpora were tokenised by their authors (" @-@ ", " 's",
"<unk>"), and scoring that spacing would measure the tokenisation rather than the model. The detokenisers here are
ordered rewrite rules with the same effect as BD3-LM's; one rule of BD3-LM's WikiText detokeniser is left out
because, being a regular expression written with literal slashes (`/' [0-9]/`), it never matches WikiText.

Splits follow BD3-LM: `validation`, except `test` for LM1B and AG News and LAMBADA's only split (LAMBADA comes from
OpenAI's `lambada_test.jsonl` upstream, which is `EleutherAI/lambada_openai` on the Hub).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from did_cli.errors import UsageError

Rule = tuple[str | re.Pattern[str], str]


def _apply(rules: list[Rule], text: str) -> str:
    for pattern, replacement in rules:
        text = text.replace(pattern, replacement) if isinstance(pattern, str) else pattern.sub(replacement, text)
    return text


# Spaced-out brackets and quotes: "( a b )" -> "(a b)", shortest span first.
_WIKITEXT_RULES: list[Rule] = [
    ("s '", "s'"),
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    *((f" {mark} ", f"{mark} ") for mark in (":", ";", ".", "!", "?", ",")),
    *(
        (re.compile(rf"{re.escape(left)}\s*([^{re.escape(right)}]*?)\s*{re.escape(right)}"), rf"{left}\1{right}")
        for left, right in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'"))
    ),
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]

_PTB_RULES: list[Rule] = [
    (" 's", "'s"),
    ("s ' ", "s' "),
    (" n't", "n't"),
    (" \n ", "\n"),
    ("\\/", "/"),
    # " N N N " needs several passes because each match consumes the space the next one starts with.
    *([(" N ", " 1 ")] * 10),
    ("$ 1", "$1"),
    ("# 1", "#1"),
    ("<unk>", "?"),
]

_LM1B_RULES: list[Rule] = [
    ("http : / / ", "http://"),
    ("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), r"'\1"),
    (re.compile(r" (\w+) \. "), r" \1. "),
    (re.compile(r" (\w+) \.$"), r" \1."),
    (" ? ", "? "),
    (re.compile(r" \?$"), "?"),
    (" ! ", "! "),
    (re.compile(r" !$"), "!"),
    *((f" {mark} ", f"{mark} ") for mark in (",", ":", ";")),
    (" / ", "/"),
    (re.compile(r'" ([^"]+) "'), r'"\1"'),
    (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^()]+) \)"), r"(\1)"),
    (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"),
    ("\N{POUND SIGN} ", "\N{POUND SIGN}"),
]


def detokenize_wikitext(text: str) -> str:
    """WikiText's spacing undone: " @-@ " joins, punctuation and brackets re-attached, "= = =" headings closed."""
    return _apply(_WIKITEXT_RULES, text)


def detokenize_ptb(text: str) -> str:
    """PTB's spacing undone; its number placeholder N becomes 1 and <unk> becomes "?"."""
    return _apply(_PTB_RULES, text)


def detokenize_lm1b(text: str) -> str:
    """LM1B's spacing undone (URLs, contractions, sentence-final punctuation, quotes and brackets)."""
    return _apply(_LM1B_RULES, text)


def detokenize_lambada(text: str) -> str:
    """Curly double quotes straightened; the passage starts on a new line, as BD3-LM feeds it."""
    return (
        "\n"
        + text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"').strip()
    )


def detokenize_scientific_papers(text: str) -> str:
    """The WikiText rules, then the LM1B ones (BD3-LM's choice for PubMed and arXiv articles)."""
    return detokenize_lm1b(detokenize_wikitext(text))


@dataclass(frozen=True)
class Preset:
    """Where a zero-shot set lives on the Hub and how its text is cleaned before tokenisation."""

    name: str
    dataset: str
    config: str | None
    split: str
    text_field: str
    detokenize: Callable[[str], str] | None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("wikitext-103", "wikitext", "wikitext-103-raw-v1", "validation", "text", detokenize_wikitext),
        Preset("wikitext-2", "wikitext", "wikitext-2-raw-v1", "validation", "text", detokenize_wikitext),
        Preset("ptb", "ptb_text_only", None, "validation", "sentence", detokenize_ptb),
        Preset("lm1b", "lm1b", None, "test", "text", detokenize_lm1b),
        Preset("lambada", "EleutherAI/lambada_openai", "default", "test", "text", detokenize_lambada),
        Preset("ag_news", "ag_news", None, "test", "text", None),
        Preset(
            "scientific_papers_pubmed",
            "scientific_papers",
            "pubmed",
            "validation",
            "article",
            detokenize_scientific_papers,
        ),
        Preset(
            "scientific_papers_arxiv",
            "scientific_papers",
            "arxiv",
            "validation",
            "article",
            detokenize_scientific_papers,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`.

    Raises:
        UsageError: an unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
