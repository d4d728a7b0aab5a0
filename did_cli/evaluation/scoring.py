"""Pure scoring for generative perplexity: token ids and a logits callable in, per-sample and per-file numbers out.

BD3-LM's `metrics.record_generative_perplexity` (research notes, bd3lm.md §4), without files or transformers:

* Next-token NLL uses a context of 1024 tokens. Longer samples use upstream's sliding window with stride 512:
  window 0 covers [0, 1024); window i >= 1 covers [i·512, i·512 + 1024), cut at the end of the sample, and scores
  the positions from i·512 + 512 on. Every token is scored exactly once, with at least context - stride tokens of
  context.
* Every EOS id among the targets is excluded.
* `gen_ppl` is the paper pipeline's aggregate: the arithmetic mean of per-sample perplexities. `gen_ppl_pooled`
  is the token-weighted exp(mean NLL) that upstream prints.
* `entropy` is the unigram entropy (nats) of each sample's judge tokens, averaged over samples. Samples whose
  entropy falls below `degenerate_threshold` are counted, not hidden, because repetitive text gets a low
  perplexity. Upstream rejects a sample when the entropy of its last 256 tokens is below 4 nats; an n-token
  sample's entropy is at most log n, so for n < 256 the threshold is scaled by log n / log 256 (4.0 becomes
  3.5 at 128 tokens) and a short sample is judged as upstream would judge 256 tokens.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from did_cli.errors import UsageError

__all__ = [
    "DEGENERATE_WINDOW",
    "FileResult",
    "SampleResult",
    "Window",
    "degenerate_threshold",
    "score_sequence",
    "sliding_windows",
    "summarize",
    "target_nlls",
    "unigram_entropy",
]

# (input_ids [B, T] long, attention_mask [B, T] long) -> logits [B, T, V]; right padding, 1 marks real tokens.
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (windows done, windows total) after each judge call.
WindowProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Window:
    """One judge call over tokens [begin, end) that scores the tokens at positions [first_target, end)."""

    begin: int
    end: int
    first_target: int


def sliding_windows(num_tokens: int, context: int, stride: int, first_target: int = 1) -> list[Window]:
    """The judge calls that score positions [first_target, num_tokens) of a sequence, each position exactly once.

    Upstream's layout (`metrics.record_generative_perplexity`): there are max(1, ceil((N - context + stride) /
    stride)) windows. Window 0 covers [0, min(N, context)) and scores from position 1; window i >= 1 starts at
    i·stride, ends at min(i·stride + context, N) and scores the positions from i·stride + context - stride on. The
    last window therefore starts at a multiple of the stride even when the sample ends before it is full, so it may
    see less than `context` tokens. Windows that would score nothing (inside a prompt) are left out.

    Args:
        num_tokens: length of the sequence, BOS included.
        context: most tokens per window.
        stride: how far each later window advances; 1 <= stride < context, so every scored token has context.
        first_target: first position to score (1 after BOS; later when a prompt precedes the text).

    Returns:
        The windows in order; their [first_target, end) ranges are disjoint and cover [first_target, num_tokens).
    """
    if context < 2 or not 1 <= stride < context:
        raise UsageError(f"a sliding window needs 1 <= stride < context, got stride {stride}, context {context}")
    first_target = max(first_target, 1)
    windows = []
    for i in range(max(1, math.ceil((num_tokens - context + stride) / stride))):
        begin = i * stride
        end = min(begin + context, num_tokens)
        scored_from = 1 if i == 0 else begin + context - stride
        if end > first_target:
            windows.append(Window(begin, end, max(scored_from, first_target)))
    return windows


def target_nlls(
    sequences: Sequence[Sequence[int]],
    logits_fn: LogitsFn,
    *,
    context: int,
    stride: int,
    batch_size: int = 1,
    first_targets: Sequence[int] | None = None,
    on_progress: WindowProgressFn | None = None,
) -> list[torch.Tensor]:
    """Next-token NLL of every scored position of each sequence, using `sliding_windows`.

    Windows from all sequences are batched together, right-padded, with an attention mask. A window's numbers
    depend only on its own tokens, so the batch size changes them by float noise at most.

    Args:
        sequences: token ids per sample, BOS first.
        logits_fn: the judge: (input_ids [B, T] long, attention_mask [B, T] long) → logits [B, T, V].
        context: most tokens per judge call.
        stride: sliding-window stride (1 <= stride < context).
        batch_size: windows per judge call.
        first_targets: per sequence, the first position to score (default 1: everything after BOS).
        on_progress: called with (windows done, windows total) after each judge call.

    Returns:
        Per sequence a float64 tensor [N]: entry t is -log p(tokens[t] | the window's tokens before t), and NaN
        where nothing is scored (BOS, prompt). EOS targets are not removed here; see `score_sequence`.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    firsts = list(first_targets) if first_targets is not None else [1] * len(sequences)
    out = [torch.full((len(seq),), math.nan, dtype=torch.float64) for seq in sequences]
    chunks = [(i, w) for i, seq in enumerate(sequences) for w in sliding_windows(len(seq), context, stride, firsts[i])]
    # Longest first, so windows of similar length share a call and little compute goes to padding.
    chunks.sort(key=lambda chunk: chunk[1].begin - chunk[1].end)
    with torch.inference_mode():
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size]
            width = max(w.end - w.begin for _, w in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)  # B, T; pad id 0 is masked out
            attention_mask = torch.zeros_like(input_ids)
            for row, (i, w) in enumerate(batch):
                input_ids[row, : w.end - w.begin] = torch.as_tensor(sequences[i][w.begin : w.end])
                attention_mask[row, : w.end - w.begin] = 1
            logits = logits_fn(input_ids, attention_mask)  # B, T, V
            for row, (i, w) in enumerate(batch):
                lo, hi = w.first_target - w.begin, w.end - w.begin
                targets = input_ids[row, lo:hi].to(logits.device)
                # Logits at position p predict token p + 1; fp32 softmax whatever the judge's dtype.
                nll = F.cross_entropy(logits[row, lo - 1 : hi - 1].float(), targets, reduction="none")
                out[i][w.first_target : w.end] = nll.double().cpu()
            if on_progress is not None:
                on_progress(start + len(batch), len(chunks))
    return out


def unigram_entropy(token_ids: Sequence[int]) -> float:
    """Entropy (nats) of the token frequency distribution of one sample; 0 for an empty one."""
    total = len(token_ids)
    if total == 0:
        return 0.0
    return -math.fsum(n / total * math.log(n / total) for n in Counter(token_ids).values())


# Upstream's entropy check looks at a sample's last 256 tokens (research notes, bd3lm.md §3).
DEGENERATE_WINDOW = 256


def degenerate_threshold(threshold: float, num_tokens: int) -> float:
    """The entropy below which an n-token sample is degenerate: `threshold` × min(1, log n / log 256).

    The entropy of n tokens is at most log n, so a fixed threshold would flag most short samples (4.0 nats
    exceeds 80% of log 127); scaling by log n keeps the bar at the same fraction of the maximum as at 256 tokens.
    """
    if num_tokens < 2:
        return 0.0
    return threshold * min(1.0, math.log(num_tokens) / math.log(DEGENERATE_WINDOW))


@dataclass(frozen=True)
class SampleResult:
    """The judge's verdict on one sample.

    Attributes:
        line: line of the input file the sample came from (None for samples given in memory).
        id: the record's `id`, when it had one.
        tokens: judge tokens of the text (BOS and prompt excluded).
        scored_tokens: tokens whose NLL counts: the text's tokens that are not EOS.
        nll_sum: summed NLL (nats) of the scored tokens.
        entropy: unigram entropy (nats) of BOS + the text's judge tokens, as upstream's retokenised ids.
        degenerate: entropy below the settings' threshold scaled to the sample's length (`degenerate_threshold`).
        truncated: judge tokens cut off the end by `max_tokens` (not scored, not in the entropy).
    """

    line: int | None
    id: Any
    tokens: int
    scored_tokens: int
    nll_sum: float
    entropy: float
    degenerate: bool
    truncated: int = 0

    @property
    def nll(self) -> float:
        """Mean NLL per scored token (NaN when no token was scored)."""
        return self.nll_sum / self.scored_tokens if self.scored_tokens else math.nan

    @property
    def ppl(self) -> float:
        """exp(mean NLL): this sample's perplexity."""
        return _exp(self.nll)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (NaN as null)."""
        body = {
            "line": self.line,
            "id": self.id,
            "ppl": self.ppl,
            "nll": self.nll,
            "tokens": self.tokens,
            "scored_tokens": self.scored_tokens,
            "entropy": self.entropy,
            "degenerate": self.degenerate,
            "truncated": self.truncated,
        }
        return {key: json_number(value) for key, value in body.items()}


def score_sequence(
    token_ids: Sequence[int],
    nlls: torch.Tensor,
    *,
    first_target: int = 1,
    eos_ids: Collection[int] = (),
    degenerate_entropy: float = 4.0,
    line: int | None = None,
    id: Any = None,
    truncated: int = 0,
) -> SampleResult:
    """One sample's result from its judge ids (BOS first) and the per-position NLLs of `target_nlls`.

    Args:
        token_ids: BOS, prompt tokens, then text tokens.
        nlls: float [N] from `target_nlls`; entries from `first_target` on are used.
        first_target: position of the first text token.
        eos_ids: ids never counted as targets (upstream excludes every EOS, wherever it appears).
        degenerate_entropy: threshold at 256 tokens below which the sample is flagged (`degenerate_threshold`).
        line: input line, for reporting.
        id: record id, for reporting.
        truncated: tokens cut off before scoring, for reporting.
    """
    text_ids = list(token_ids[first_target:])
    counted = torch.tensor([t not in eos_ids for t in text_ids], dtype=torch.bool)
    nll_sum = float(nlls[first_target:][counted].sum()) if text_ids else 0.0
    entropy_ids = [token_ids[0], *text_ids] if token_ids else []
    entropy = unigram_entropy(entropy_ids)
    degenerate = entropy < degenerate_threshold(degenerate_entropy, len(entropy_ids))
    return SampleResult(line, id, len(text_ids), int(counted.sum()), nll_sum, entropy, degenerate, truncated)


@dataclass(frozen=True)
class FileResult:
    """Aggregates over the samples of one input.

    Attributes:
        source: the input's name as given.
        samples: every sample's result, in input order.
        gen_ppl: mean of per-sample perplexities (the paper pipeline's number), over samples with a scored token.
        gen_ppl_pooled: exp(token-weighted mean NLL) over all scored tokens.
        entropy: mean per-sample unigram entropy (nats).
        num_samples: samples read.
        num_degenerate: samples with entropy below the threshold.
        mean_tokens: mean text length in judge tokens.
        num_scored_tokens: tokens behind `gen_ppl_pooled`.
        num_unscored: samples with no token to score (empty text or only EOS), left out of `gen_ppl`.
    """

    source: str
    samples: list[SampleResult]
    gen_ppl: float
    gen_ppl_pooled: float
    entropy: float
    num_samples: int
    num_degenerate: int
    mean_tokens: float
    num_scored_tokens: int
    num_unscored: int

    def summary(self) -> dict[str, Any]:
        """The aggregates, JSON-ready (NaN as null)."""
        body = {key: value for key, value in asdict(self).items() if key not in ("source", "samples")}
        return {key: json_number(value) for key, value in body.items()}


def summarize(source: str, samples: Sequence[SampleResult]) -> FileResult:
    """Both aggregations, mean entropy and counts over one input's samples."""
    scored = [s for s in samples if s.scored_tokens > 0]
    total = sum(s.scored_tokens for s in samples)
    return FileResult(
        source=source,
        samples=list(samples),
        gen_ppl=math.fsum(s.ppl for s in scored) / len(scored) if scored else math.nan,
        gen_ppl_pooled=_exp(math.fsum(s.nll_sum for s in samples) / total) if total else math.nan,
        entropy=math.fsum(s.entropy for s in samples) / len(samples) if samples else math.nan,
        num_samples=len(samples),
        num_degenerate=sum(s.degenerate for s in samples),
        mean_tokens=sum(s.tokens for s in samples) / len(samples) if samples else math.nan,
        num_scored_tokens=total,
        num_unscored=len(samples) - len(scored),
    )


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def json_number(value: Any) -> Any:
    # JSON has no NaN; null says "undefined" (no sample to average) without breaking strict parsers.
    return None if isinstance(value, float) and not math.isfinite(value) else value
