"""Generative perplexity, entropy and MAUVE of sample files under a judge LM, the way BD3-LM's numbers are computed.

The protocol follows BD3-LM's `metrics.record_generative_perplexity` (research notes, bd3lm.md §4); the pure
windowing and aggregation live in `did_cli.evaluation.scoring`. Here:

* Each sample's decoded text is re-tokenised with the judge's tokenizer and preceded by the judge's BOS/EOS id,
  since upstream's decoded samples start with `<|endoftext|>`. A record's prompt follows BOS as unscored context.
* The re-tokenised ids (BOS included) are cut to the sampling length, as upstream re-tokenises with
  `truncation=True, max_length=model.length`: a did record's own length (`samples.sample_from_record`),
  `max_tokens` for plain text (1024 by default); `max_tokens=0` scores everything. Entropy uses the same cut ids.
* Optionally the text is first cleaned up as transformers' `clean_up_tokenization_spaces=True` decoding does (the
  default of the transformers release the paper used; later releases decode GPT-2 without it).

`score_file` is the one scoring path: `did eval-ppl` and the sweep both score every file through it (with the
samples `sample_from_record` builds), so the same file gets the same numbers wherever it is scored. `ReferenceMauve`
is likewise the one MAUVE path: each file's texts are cut as its gen PPL cuts them and compared with the reference
cut alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from did_cli.errors import InputError, UsageError
from did_cli.evaluation.judge import DEFAULT_JUDGE, Judge, load_judge
from did_cli.evaluation.mauve import MauveReport, MauveResult, MauveSettings, mauve_scorer, mauve_unavailable
from did_cli.evaluation.samples import Sample, SampleFile, read_reference_file, read_sample_file
from did_cli.evaluation.scoring import FileResult, WindowProgressFn, score_sequence, summarize, target_nlls
from did_cli.evaluation.settings import EvalSettings
from did_cli.processes import ONE_PROCESS, Processes
from did_cli.provenance import device_info, versions

__all__ = [
    "PLAIN_TEXT_MAX_TOKENS",
    "EvalResult",
    "EvalSettings",
    "ReferenceMauve",
    "eval_ppl",
    "mauve_cut",
    "score_file",
    "score_samples",
]

# Upstream's max_length for texts that carry no length of their own: BD3-LM's model length.
PLAIN_TEXT_MAX_TOKENS = 1024


def score_samples(
    samples: Sequence[Sample | str],
    judge: Judge,
    settings: EvalSettings | None = None,
    *,
    source: str = "<samples>",
    on_progress: WindowProgressFn | None = None,
) -> FileResult:
    """Score texts (or Samples with prompts) under a judge, in this process, and aggregate them.

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


def score_file(
    samples: Sequence[Sample],
    judge: Judge,
    settings: EvalSettings,
    *,
    source: str,
    processes: Processes = ONE_PROCESS,
    on_progress: WindowProgressFn | None = None,
) -> FileResult:
    """One file's gen PPL and entropy: each process scores the samples it owns, every process gets the whole result.

    The one scoring path of `eval_ppl` and the sweep. A window's numbers depend only on its own tokens, so the
    result equals a one-process run's up to float rounding of batched judge calls.
    """
    result = score_samples(processes.mine(list(samples)), judge, settings, source=source, on_progress=on_progress)
    return result if processes.world == 1 else summarize(source, processes.all_of(result.samples))


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


# --- MAUVE ------------------------------------------------------------------------------------------------------------


def mauve_texts(samples: Sequence[Sample], judge: Judge, settings: EvalSettings) -> list[str]:
    """The texts MAUVE compares: as gen PPL scores them (a prompt conditions gen PPL but is not generated text)."""
    if settings.clean_up_spaces:
        return [judge.tokenizer.clean_up_tokenization(s.text) for s in samples]
    return [s.text for s in samples]


def mauve_cut(settings: EvalSettings, samples: Sequence[Sample], judge: Judge) -> int:
    """The MAUVE token cut for one file's samples, and for the reference compared with them.

    --max-tokens, else the records' longest sampling length (human text is cut as long as the samples), else 1024;
    0 or anything longer stops at the judge's positions.
    """
    if settings.max_tokens is not None:
        limit = settings.max_tokens
    else:
        limit = max((s.max_tokens for s in samples if s.max_tokens), default=PLAIN_TEXT_MAX_TOKENS)
    positions = judge.max_positions or PLAIN_TEXT_MAX_TOKENS
    return max(2, min(limit, positions)) if limit else positions


class ReferenceMauve:
    """MAUVE of sample files against one reference, each file cut as its gen PPL is: the one MAUVE path.

    The reference is featurised once per distinct cut, on first use, so a file's MAUVE never depends on which other
    files are scored beside it.

    Raises:
        MauveUnavailable: mauve-text is not installed (at construction; `mauve_unavailable` says so beforehand).
        InputError: fewer than 2 reference texts.
    """

    def __init__(self, references: Sequence[Sample], judge: Judge, settings: EvalSettings) -> None:
        if len(references) < 2:
            raise InputError(f"MAUVE needs at least 2 reference texts, found {len(references)}")
        self.judge, self.settings = judge, settings
        self.texts = mauve_texts(references, judge, settings)
        self._scorers: dict[int, Callable[[Sequence[str]], MauveResult]] = {}

    def __call__(self, samples: Sequence[Sample]) -> MauveResult:
        """MAUVE of one file's samples against the reference."""
        cut = mauve_cut(self.settings, samples, self.judge)
        if cut not in self._scorers:
            mauve = MauveSettings(cut, self.settings.batch_size)
            self._scorers[cut] = mauve_scorer(self.texts, self.judge, mauve)
        return self._scorers[cut](mauve_texts(samples, self.judge, self.settings))


# --- eval_ppl ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Per-input results plus everything needed to reproduce them: judge, settings, package versions.

    `mauve` is set when a reference was given: each input's MAUVE against it, or why it was skipped. `sha256` maps
    each input's name (and the reference's) to the sha256 of the bytes read from it (stdin's too).
    """

    files: list[FileResult]
    judge: dict[str, Any]
    settings: dict[str, Any]
    versions: dict[str, Any]
    mauve: MauveReport | None = None
    sha256: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The `--json` body: per input its aggregates and `sha256`, then judge, settings, versions; `mauve` too.

        With a reference, each input's aggregates hold its `mauve` (null when skipped) and the body the MAUVE report,
        with the reference's `reference_sha256`.
        """
        files = {f.source: {**f.summary(), "sha256": self.sha256.get(f.source)} for f in self.files}
        if self.mauve is not None:
            for source, summary in files.items():
                summary["mauve"] = self.mauve.value(source)
        body = {"files": files, "judge": self.judge, "settings": self.settings, "versions": self.versions}
        if self.mauve is None:
            return body
        return {**body, "mauve": {**self.mauve.to_dict(), "reference_sha256": self.sha256.get(self.mauve.reference)}}


def eval_ppl(
    sources: Sequence[str | Path],
    judge: Judge | str = DEFAULT_JUDGE,
    settings: EvalSettings | None = None,
    *,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    processes: Processes = ONE_PROCESS,
    reference: str | Path | None = None,
) -> EvalResult:
    """Generative perplexity and entropy of each input file under a judge (what `did eval-ppl` runs).

    Every input is read before the judge loads, so a malformed line fails fast. With several processes, each scores
    the samples at the positions it owns and every process returns the one-process result, in input order.

    Args:
        sources: sample-record JSONL, `.jsonl` with a `text` field, `.txt` with one sample per line, or "-".
        judge: a loaded Judge, or a name for `load_judge` (default gpt2-large, as published).
        settings: context, stride, batch size and degenerate threshold.
        revision: Hub revision of the judge.
        device: where the judge runs (when loaded here).
        dtype: the judge's weights dtype (when loaded here); float32 as upstream.
        on_progress: called with (source, windows done, windows total) after each judge call.
        processes: the processes sharing the work (`processes.current_processes()` under a launcher).
        reference: a file of reference texts (read like the inputs): adds each input's MAUVE against it
            (`ReferenceMauve`), skipped with a note when mauve-text is not installed. Every process computes it whole.
    """
    settings = settings or EvalSettings()
    if not sources:
        raise UsageError("give at least one input file")
    names = [str(source) for source in sources]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise UsageError(f"{repeated} is given twice; each input is one row of the results")
    read = [(name, read_sample_file(source)) for name, source in zip(names, sources, strict=True)]
    inputs = [(name, file.samples) for name, file in read]
    digests = {name: file.sha256 for name, file in read}
    references = _read_reference(reference, inputs) if reference is not None else None
    if references is not None:
        digests.setdefault(str(reference), references.sha256)
    if not isinstance(judge, Judge):
        judge = load_judge(judge, revision=revision, device=device, dtype=dtype)
    context, stride = settings.windows_for(judge.max_positions)
    files = []
    for name, samples in inputs:
        progress = functools.partial(on_progress, name) if on_progress else None
        files.append(score_file(samples, judge, settings, source=name, processes=processes, on_progress=progress))
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
        skipped = mauve_unavailable()
        if skipped is not None:
            mauve = MauveReport(str(reference), {}, skipped)
        else:
            against = ReferenceMauve(references.samples, judge, settings)
            mauve = MauveReport(str(reference), {name: against(samples) for name, samples in inputs})
    return EvalResult(files, dict(judge.info), run_settings, versions(), mauve, digests)


def _read_reference(reference: str | Path, inputs: list[tuple[str, list[Sample]]]) -> SampleFile:
    """The reference texts and their digest, read (and refused in one line) before the judge loads."""
    if str(reference) == "-" and any(name == "-" for name, _ in inputs):
        raise UsageError("stdin (-) cannot be both an input and the reference")
    references = read_reference_file(reference)
    for name, samples in [(str(reference), references.samples), *inputs]:
        if len(samples) < 2:
            raise InputError(f"MAUVE needs at least 2 texts per file; {name} has {len(samples)}")
    return references
