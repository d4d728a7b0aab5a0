"""Generative perplexity and entropy of samples under a judge LM, computed the way BD3-LM's published numbers are.

The protocol follows BD3-LM's `metrics.record_generative_perplexity` (research notes, bd3lm.md §4):

* Each sample's decoded text is re-tokenised with the judge's tokenizer and preceded by the judge's BOS/EOS id,
  since upstream's decoded samples start with `<|endoftext|>`. A record's prompt follows BOS as unscored context.
* The re-tokenised ids (BOS included) are cut to the sampling length, as upstream re-tokenises with
  `truncation=True, max_length=model.length`: a did record's own length, `max_tokens` for plain text (1024 by
  default); `max_tokens=0` scores everything. Entropy is computed on the same cut ids.
* Optionally the text is first cleaned up as transformers' `clean_up_tokenization_spaces=True` decoding does (the
  default of the transformers release the paper used; later releases decode GPT-2 without it).
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

Layout: the pure functions over token ids and a logits callable (`sliding_windows`, `target_nlls`,
`unigram_entropy`, `score_sequence`, `summarize`) come first and know nothing of files or transformers. Then come
input files (`read_samples`) and last the API that joins them with a judge (`score_samples`, `eval_ppl`). Loading
the judge lives in `did_cli.judge` (re-exported here). Given a reference file, `eval_ppl` adds each input's MAUVE
against it (`did_cli.mauve`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F

from did_cli.distributed import ONE_PROCESS, Shard, interleave
from did_cli.errors import InputError, UsageError
from did_cli.judge import DEFAULT_JUDGE, Judge, load_judge
from did_cli.mauve import MauveReport, MauveSettings, mauve_report
from did_cli.provenance import device_info, versions
from did_cli.records import parse_record

__all__ = [
    "DEFAULT_JUDGE",
    "EvalResult",
    "EvalSettings",
    "FileResult",
    "Judge",
    "Sample",
    "SampleResult",
    "Window",
    "degenerate_threshold",
    "eval_ppl",
    "load_judge",
    "read_reference",
    "read_samples",
    "score_samples",
    "score_sequence",
    "sliding_windows",
    "summarize",
    "target_nlls",
    "unigram_entropy",
]

# Upstream's max_length for texts that carry no length of their own: BD3-LM's model length.
PLAIN_TEXT_MAX_TOKENS = 1024

# (input_ids [B, T] long, attention_mask [B, T] long) -> logits [B, T, V]; right padding, 1 marks real tokens.
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (windows done, windows total) after each judge call.
WindowProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class EvalSettings:
    """How samples are scored.

    Attributes:
        context: most tokens the judge sees at once (capped at the judge's own limit); 1024 upstream.
        stride: tokens each later sliding window advances; None means half the context (512 upstream).
        batch_size: windows per judge call. Changes speed and memory, not the numbers (beyond float noise).
        degenerate_entropy: samples with a unigram entropy (nats) below this are counted as degenerate; it is
            the threshold at 256 tokens or more, scaled down for shorter samples (see `degenerate_threshold`).
        max_tokens: cut each sample's judge ids (BOS included) to this many, as upstream's `max_length`. None: a did
            record's own length (its draft length), `PLAIN_TEXT_MAX_TOKENS` for other texts; 0: never cut.
        clean_up_spaces: apply transformers' `clean_up_tokenization` to each text before re-tokenising it, which
            is what decoding with `clean_up_tokenization_spaces=True` (the paper-era default) would have produced.
    """

    context: int = 1024
    stride: int | None = None
    batch_size: int = 8
    degenerate_entropy: float = 4.0
    max_tokens: int | None = None
    clean_up_spaces: bool = False

    def __post_init__(self) -> None:
        if self.context < 2:
            raise UsageError(f"--context must be at least 2 tokens, got {self.context}")
        if self.stride is not None and self.stride < 1:
            raise UsageError(f"--stride must be at least 1, got {self.stride}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise UsageError(f"--max-tokens must be at least 0 (0 scores everything), got {self.max_tokens}")
        if not (math.isfinite(self.degenerate_entropy) and self.degenerate_entropy >= 0):
            raise UsageError(
                f"--degenerate-entropy must be a finite number of nats >= 0, got {self.degenerate_entropy}"
            )

    def windows_for(self, max_positions: int | None) -> tuple[int, int]:
        """The (context, stride) used with a judge that accepts at most `max_positions` tokens."""
        context = min(self.context, max_positions) if max_positions else self.context
        stride = self.stride if self.stride is not None else context // 2
        if stride >= context:
            raise UsageError(f"--stride {stride} must be smaller than the context of {context} tokens")
        return context, stride


# --- Pure scoring: token ids and a logits callable in, numbers out ---------------------------------------------------


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
        return {key: _json_number(value) for key, value in body.items()}


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
        return {key: _json_number(value) for key, value in body.items()}


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


def _json_number(value: Any) -> Any:
    # JSON has no NaN; null says "undefined" (no sample to average) without breaking strict parsers.
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --- Input files ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One text to score, with an optional prompt that conditions it without being scored.

    `max_tokens` is the length the text was sampled at (a did record's draft length), used to cut it as upstream.
    """

    text: str
    prompt: str | None = None
    line: int | None = None
    id: Any = None
    max_tokens: int | None = None


def read_samples(source: str | Path) -> list[Sample]:
    """Samples from a file, or from stdin when `source` is "-".

    A `.txt` file holds one sample per line. Anything else is JSONL whose objects have a `text` string and
    optionally a `prompt` (string or null) and an `id`; did's sample records are such objects. Blank lines are
    skipped.

    Raises:
        InputError: a missing or non-UTF-8 file, a malformed line (naming its number), or no sample at all.
    """
    name = "stdin" if str(source) == "-" else str(source)
    plain = Path(str(source)).suffix.lower() == ".txt"
    samples = []
    with _open_input(source, name) as stream:
        try:
            for lineno, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                if plain:
                    samples.append(Sample(line.rstrip("\r\n"), line=lineno))
                else:
                    samples.append(_parse_sample(line, name, lineno, first=not samples))
        except UnicodeDecodeError:
            raise InputError(f"{name} is not UTF-8 text") from None
    if not samples:
        raise InputError(f"{name} holds no samples")
    return samples


@contextlib.contextmanager
def _open_input(source: str | Path, name: str) -> Iterator[IO[str]]:
    if str(source) == "-":
        yield sys.stdin
        return
    path = Path(source)
    if path.is_dir():
        raise InputError(f"input {name} is a directory, not a samples file")
    if not path.is_file():
        raise InputError(f"input file {name} does not exist")
    try:
        stream = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror}") from None
    with stream:
        yield stream


def _parse_sample(line: str, name: str, lineno: int, first: bool) -> Sample:
    where = f"{name} line {lineno}"
    try:
        body = json.loads(line)
    except json.JSONDecodeError as exc:
        hint = "; for plain text with one sample per line, name the file .txt" if first else "; truncated?"
        raise InputError(f"{where}: not valid JSON ({exc.msg}{hint})") from None
    if not isinstance(body, dict):
        raise InputError(f"{where}: expected a JSON object with a text field")
    if "tokens" in body or "confidence" in body:
        parse_record(line, where)  # a did sample record is checked field by field, as refine and show check it
    text, prompt = body.get("text"), body.get("prompt")
    if not isinstance(text, str):
        raise InputError(f"{where}: no text field (a string) to score")
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"{where}: prompt must be a string or null")
    return Sample(text, prompt, lineno, body.get("id"), _sampled_length(body))


def _sampled_length(body: dict[str, Any]) -> int | None:
    """A did record's sampling length: its draft stage's `length`, else its token count; None for other JSON."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        return None
    stages = body.get("stages")
    first = stages[0] if isinstance(stages, list) and stages and isinstance(stages[0], dict) else {}
    length = first.get("length")
    return length if isinstance(length, int) and length > 0 else len(tokens)


# --- API -----------------------------------------------------------------------------------------------------------


def score_samples(
    samples: Sequence[Sample | str],
    judge: Judge,
    settings: EvalSettings | None = None,
    *,
    source: str = "<samples>",
    on_progress: WindowProgressFn | None = None,
) -> FileResult:
    """Score texts (or Samples with prompts) under a judge and aggregate them.

    Args:
        samples: texts, or Samples whose prompt conditions the text without being scored.
        judge: from `load_judge`, or `Judge(model, tokenizer)` for any transformers causal LM.
        settings: context, stride, batch size and degenerate threshold.
        source: name reported for these samples.
        on_progress: called with (windows done, windows total) after each judge call.
    """
    settings = settings or EvalSettings()
    context, stride = settings.windows_for(judge.max_positions)
    items = [s if isinstance(s, Sample) else Sample(s) for s in samples]
    encoded = [_encode(judge, s, settings) for s in items]
    nlls = target_nlls(
        [ids for ids, _, _ in encoded],
        judge,
        context=context,
        stride=stride,
        batch_size=settings.batch_size,
        first_targets=[first for _, first, _ in encoded],
        on_progress=on_progress,
    )
    results = [
        score_sequence(
            ids,
            nll,
            first_target=first,
            eos_ids=judge.eos_ids,
            degenerate_entropy=settings.degenerate_entropy,
            line=s.line,
            id=s.id,
            truncated=truncated,
        )
        for s, (ids, first, truncated), nll in zip(items, encoded, nlls, strict=True)
    ]
    return summarize(source, results)


def _encode(judge: Judge, sample: Sample, settings: EvalSettings) -> tuple[list[int], int, int]:
    """(BOS + prompt + text ids cut to the sample's token limit, position of the first text token, tokens cut)."""
    text = judge.tokenizer.clean_up_tokenization(sample.text) if settings.clean_up_spaces else sample.text
    text_ids = judge.encode(text)
    prompt_ids = judge.encode(sample.prompt) if sample.prompt else []
    if not prompt_ids and text_ids[:1] == [judge.bos_id]:
        # Text decoded the upstream way already starts with <|endoftext|>; a second one would change its context.
        text_ids = text_ids[1:]
    ids = [judge.bos_id, *prompt_ids, *text_ids]
    limit = settings.max_tokens if settings.max_tokens is not None else sample.max_tokens or PLAIN_TEXT_MAX_TOKENS
    if limit and len(ids) > limit:
        return ids[:limit], 1 + len(prompt_ids), len(ids) - limit
    return ids, 1 + len(prompt_ids), 0


@dataclass
class EvalResult:
    """Per-input results plus everything needed to reproduce them: judge, settings, package versions.

    `mauve` is set when a reference was given: each input's MAUVE against it, or why it was skipped.
    """

    files: list[FileResult]
    judge: dict[str, Any]
    settings: dict[str, Any]
    versions: dict[str, Any]
    mauve: MauveReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """The `--json` body: per input its aggregates, then judge, settings, versions; with a reference, `mauve`.

        With a reference, each input's aggregates hold its `mauve` (null when skipped) and the body the MAUVE report.
        """
        files = {f.source: f.summary() for f in self.files}
        if self.mauve is not None:
            for source, summary in files.items():
                summary["mauve"] = self.mauve.value(source)
        body = {"files": files, "judge": self.judge, "settings": self.settings, "versions": self.versions}
        return body if self.mauve is None else {**body, "mauve": self.mauve.to_dict()}


def eval_ppl(
    sources: Sequence[str | Path],
    judge: Judge | str = DEFAULT_JUDGE,
    settings: EvalSettings | None = None,
    *,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    shard: Shard = ONE_PROCESS,
    gather: Callable[[list[SampleResult]], list[list[SampleResult]]] | None = None,
    reference: str | Path | None = None,
) -> EvalResult:
    """Generative perplexity and entropy of each input file under a judge (what `did eval-ppl` runs).

    Every input is read before the judge loads, so a malformed line fails fast. With several processes, each scores
    the samples at the positions its `shard` owns and `gather` (every process's results, in rank order) puts them
    back together, so every process returns the one-process result, in input order.

    Args:
        sources: sample-record JSONL, `.jsonl` with a `text` field, `.txt` with one sample per line, or "-".
        judge: a loaded Judge, or a name for `load_judge` (default gpt2-large, as published).
        settings: context, stride, batch size and degenerate threshold.
        revision: Hub revision of the judge.
        device: where the judge runs (when loaded here).
        dtype: the judge's weights dtype (when loaded here); float32 as upstream.
        on_progress: called with (source, windows done, windows total) after each judge call.
        shard: the positions this process scores.
        gather: all processes' per-sample results (accelerate's `gather_object` per rank); needed when sharded.
        reference: a file of reference texts (read like the inputs): adds each input's MAUVE against it
            (`did_cli.mauve`), skipped with a note when mauve-text is not installed. Every process computes it whole.
    """
    settings = settings or EvalSettings()
    if shard.world > 1 and gather is None:
        raise ValueError("a sharded evaluation needs `gather` to put the samples back together")
    if not sources:
        raise UsageError("give at least one input file")
    names = [str(source) for source in sources]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise UsageError(f"{repeated} is given twice; each input is one row of the results")
    inputs = [(name, read_samples(source)) for name, source in zip(names, sources, strict=True)]
    references = _read_reference(reference, inputs) if reference is not None else None
    if not isinstance(judge, Judge):
        judge = load_judge(judge, revision=revision, device=device, dtype=dtype)
    context, stride = settings.windows_for(judge.max_positions)
    files = []
    for name, samples in inputs:
        mine = [sample for position, sample in enumerate(samples) if shard.owns(position)]
        result = score_samples(
            mine,
            judge,
            settings,
            source=name,
            on_progress=functools.partial(on_progress, name) if on_progress else None,
        )
        if shard.world > 1:
            assert gather is not None
            result = summarize(name, interleave(gather(result.samples)))
        files.append(result)
    parameter = next(judge.model.parameters())
    run_settings = {
        "context": context,
        "stride": stride,
        "batch_size": settings.batch_size,
        "degenerate_entropy": settings.degenerate_entropy,
        # None: each did record's own length, 1024 for plain text; 0: nothing cut.
        "max_tokens": settings.max_tokens,
        "clean_up_tokenization_spaces": settings.clean_up_spaces,
        "device": device_info(parameter.device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "eos_ids": sorted(judge.eos_ids),
    }
    mauve = None
    if references is not None:
        # Each input is cut at its own length and compared with the reference cut alike, so an input's MAUVE never
        # depends on which other files were given with it; the reference is featurised once per distinct cut.
        by_cut: dict[int, dict[str, list[str]]] = {}
        for name, samples in inputs:
            by_cut.setdefault(_mauve_cut(settings, [(name, samples)], judge), {})[name] = _mauve_texts(
                samples, judge, settings
            )
        refs = _mauve_texts(references, judge, settings)
        parts = [
            mauve_report(texts, refs, judge, MauveSettings(cut, settings.batch_size), reference_name=str(reference))
            for cut, texts in by_cut.items()
        ]
        results = {name: part.results[name] for part in parts for name in part.results}
        skipped = next((part.skipped for part in parts if part.skipped), None)
        ordered = {name: results[name] for name, _ in inputs if name in results}
        mauve = MauveReport(str(reference), ordered, skipped)
    return EvalResult(files, dict(judge.info), run_settings, versions(), mauve)


def read_reference(source: str | Path) -> list[Sample]:
    """MAUVE's reference texts, read like any input (`read_samples`); errors say the file was the `--reference`.

    Raises:
        InputError: as `read_samples`, the message starting with `--reference:`.
    """
    try:
        return read_samples(source)
    except InputError as exc:
        raise InputError(f"--reference: {exc}") from None


def _read_reference(reference: str | Path, inputs: list[tuple[str, list[Sample]]]) -> list[Sample]:
    """The reference texts, read (and refused in one line) before the judge loads."""
    if str(reference) == "-" and any(name == "-" for name, _ in inputs):
        raise UsageError("stdin (-) cannot be both an input and the reference")
    references = read_reference(reference)
    for name, samples in [(str(reference), references), *inputs]:
        if len(samples) < 2:
            raise InputError(f"MAUVE needs at least 2 texts per file; {name} has {len(samples)}")
    return references


def _mauve_texts(samples: Sequence[Sample], judge: Judge, settings: EvalSettings) -> list[str]:
    # The texts as they are scored for gen PPL (a prompt conditions gen PPL but is not part of the generated text).
    if settings.clean_up_spaces:
        return [judge.tokenizer.clean_up_tokenization(s.text) for s in samples]
    return [s.text for s in samples]


def _mauve_cut(settings: EvalSettings, inputs: list[tuple[str, list[Sample]]], judge: Judge) -> int:
    """The MAUVE token cut for `inputs` (eval_ppl passes one input at a time) and the reference compared with them.

    --max-tokens, else the records' longest sampling length (human text is cut as long as the samples), else 1024;
    0 or anything longer stops at the judge's positions.
    """
    if settings.max_tokens is not None:
        limit = settings.max_tokens
    else:
        lengths = [s.max_tokens for _, samples in inputs for s in samples if s.max_tokens]
        limit = max(lengths, default=PLAIN_TEXT_MAX_TOKENS)
    positions = judge.max_positions or PLAIN_TEXT_MAX_TOKENS
    return max(2, min(limit, positions)) if limit else positions
