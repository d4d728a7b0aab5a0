"""The Python API behind every command: values in, records or result dataclasses out.

`did draft --block-size 4` is `api.draft(model, tokenizer, DraftSettings(length, block_size=4), ...)`; the CLI only
parses options, calls one function here and writes what it yields. Functions yield records one at a time so callers
can stream them to disk as each batch finishes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from did_cli.checkpoints import bos_token_id, load_model, load_tokenizer, save_model, tokenizer_vocab_size
from did_cli.errors import InputError, UsageError
from did_cli.evaluation import eval_nll, eval_ppl
from did_cli.execution import optimize
from did_cli.model import BD3LM
from did_cli.processes import ONE_PROCESS, Processes
from did_cli.provenance import (
    draft_stage_settings,
    model_info,
    run_provenance,
    stage_provenance,
    stage_settings,
    versions,
)
from did_cli.records import Record
from did_cli.sampling.draft import draft as draft_batch
from did_cli.sampling.edit import edit as edit_batch
from did_cli.sampling.refine import refine as refine_batch
from did_cli.settings import DraftSettings, EditSettings, RefineSettings
from did_cli.training.loop import finetune

__all__ = [
    "Progress",
    "draft",
    "encode_prompts",
    "eval_nll",
    "eval_ppl",
    "finetune",
    "generate",
    "load_model",
    "load_tokenizer",
    "optimize",
    "refine",
    "save_model",
]


@dataclass
class Progress:
    """A progress report: the stage that runs now, the samples finished, and the running stage's work on its batch.

    Attributes:
        stage: the kind of stage running, "draft" or "refine".
        samples_done: samples finished by every stage, over all batches so far.
        samples_total: samples the call makes (None when unknown: records streamed in).
        tokens_done: tokens the running stage has committed in the current batch.
        tokens_total: tokens it commits in the batch (0 between batches and before its first model call).
        calls: model calls the running stage has made in the current batch.
        batch: samples in the current batch (0 between batches).
        stage_index: which of the call's stages runs, from 0 (in `generate` 0 is the draft, 1 the first refinement).
        stages: how many stages the call runs on each batch.
    """

    stage: str
    samples_done: int
    samples_total: int | None
    tokens_done: int = 0
    tokens_total: int = 0
    calls: int = 0
    batch: int = 0
    stage_index: int = 0
    stages: int = 1


ProgressFn = Callable[[Progress], None]


def _round7(values: list[float]) -> list[float]:
    # Records store confidences to float32 precision; rounding here too makes `generate` rank exactly what a
    # `draft | refine` pipe would read back, so both paths give identical samples.
    return [float(f"{v:.7g}") for v in values]


def encode_prompts(tokenizer: Any, prompts: list[str] | None) -> list[tuple[str | None, list[int]]]:
    """(prompt text, ids) pairs: BOS followed by the prompt's tokens; unconditional is BOS alone, as in BD3-LM."""
    bos = bos_token_id(tokenizer)
    if not prompts:
        return [(None, [bos])]
    encoded = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        encoded.append((text, [bos, *ids]))
    return encoded


def commit_stats(commits: dict[int, int]) -> dict[str, Any]:
    """Tokens committed per call of one sample's stage: mean, max and histogram ({"k": calls that committed k})."""
    calls = sum(commits.values())
    tokens = sum(k * n for k, n in commits.items())
    return {
        "tokens_per_call_mean": tokens / calls if calls else 0.0,
        "tokens_per_call_max": max(commits, default=0),
        "tokens_per_call_histogram": {str(k): n for k, n in sorted(commits.items())},
    }


def _check_draft_inputs(model: BD3LM, settings: DraftSettings, encoded: list[tuple[str | None, list[int]]]) -> None:
    # Every prompt is checked before the first sample, so a bad fifth prompt cannot stop a run halfway.
    if settings.length > model.config.model_length:
        raise UsageError(
            f"length={settings.length} exceeds the model's model_length={model.config.model_length}; generating past "
            "the model's context (BD3-LM's sliding KV window) is not supported"
        )
    for number, (text, ids) in enumerate(encoded, start=1):
        if len(ids) >= settings.length:
            raise UsageError(
                f"prompt {number} ({text!r:.40}) has {len(ids)} tokens with BOS, leaving nothing to generate within "
                f"length={settings.length}"
            )


def draft(
    model: BD3LM,
    tokenizer: Any,
    settings: DraftSettings,
    *,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 1,
    prompts: list[str] | None = None,
    skip_ids: Collection[int] = (),
    processes: Processes = ONE_PROCESS,
    on_progress: ProgressFn | None = None,
) -> Iterator[Record]:
    """Draft `num_samples` samples per prompt (or unconditionally), yielding each record when its batch finishes.

    Sample ids run from 0 in order (prompt by prompt); sample `id` depends only on (seed, id), so any batch size
    gives the same tokens (confidences agree to float rounding, see README). `processes` splits the ids between the
    processes a launcher started (this process draws the ids it owns). `skip_ids` are samples a resumed run already
    has: they are not yielded, and batches are laid out as in a run without them (a batch that still lacks a sample
    is drawn whole), so every yielded record equals an unbroken run's bit for bit at the same batch size. Work is
    produced lazily: a huge `num_samples` costs no memory up front.

    Raises:
        UsageError: num_samples or batch_size below 1, length above the model's, a prompt that fills the length.
    """
    skip = set(skip_ids)
    for batch in _draft_batches(model, tokenizer, settings, num_samples, seed, batch_size, prompts, skip, processes,
                                on_progress):  # fmt: skip
        yield from (record for record in batch if record.id not in skip)


def _draft_batches(
    model: BD3LM,
    tokenizer: Any,
    settings: DraftSettings,
    num_samples: int,
    seed: int,
    batch_size: int,
    prompts: list[str] | None,
    skip: set[int],
    processes: Processes,
    on_progress: ProgressFn | None,
) -> Iterator[list[Record]]:
    """Whole batches of drafts in the unbroken run's layout; batches made only of skipped ids are left out."""
    if num_samples < 1:
        raise UsageError(f"num_samples must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    encoded = encode_prompts(tokenizer, prompts)
    _check_draft_inputs(model, settings, encoded)
    total = num_samples * len(encoded)
    ids = (i for i in range(total) if processes.owns(i))  # made as they are consumed
    provenance = run_provenance(model, tokenizer)
    stage_settings = {**draft_stage_settings(settings, seed), **stage_provenance(model), "processes": processes.world}
    done = sum(1 for i in skip if 0 <= i < total and processes.owns(i))  # what a resumed run already has
    vocab_size = tokenizer_vocab_size(tokenizer)
    while batch := list(itertools.islice(ids, batch_size)):
        if all(i in skip for i in batch):
            continue
        on_call = _call_progress(on_progress, "draft", done, total, sum(1 for i in batch if i not in skip))
        jobs = [(i, *encoded[i // num_samples]) for i in batch]  # (id, prompt text, prompt ids)
        result = draft_batch(
            model,
            [ids for _, _, ids in jobs],
            batch,
            settings,
            seed,
            on_call,
            eos_id=tokenizer.eos_token_id,
            vocab_size=vocab_size,
        )
        # A variable-length sample ends at its own length; the rest of its row is unused.
        tokens = [row[:n] for row, n in zip(result.tokens.tolist(), result.lengths, strict=True)]
        measures = [
            [row[:n] for row, n in zip(values.tolist(), result.lengths, strict=True)]
            for values in (result.confidence, result.entropy, result.margin)
        ]
        records = []
        for row, (sample_id, text, _) in enumerate(jobs):
            prompt_len = result.prompt_lengths[row]
            stage = {
                **stage_settings,
                "tries": result.tries[row],
                "nfes": result.nfes[row],
                "model_calls": result.model_calls,
                "cache_calls": result.cache_calls,
                **commit_stats(result.commits[row]),
                "batch_size": len(batch),
                "seconds": result.seconds / len(batch),
            }
            records.append(
                Record(
                    id=sample_id,
                    seed=seed,
                    tokens=tokens[row],
                    confidence=_round7(measures[0][row]),
                    entropy=_round7(measures[1][row]),
                    margin=_round7(measures[2][row]),
                    prompt_len=prompt_len,
                    prompt=text,
                    text=tokenizer.decode(tokens[row][prompt_len:]),
                    draft_tokens=tokens[row],
                    stages=[stage],
                    **provenance,
                )
            )
        yield records
        done += sum(1 for i in batch if i not in skip)
        if on_progress is not None:
            on_progress(Progress("draft", done, total))


def refine(
    model: BD3LM,
    tokenizer: Any,
    records: Iterable[Record],
    settings: RefineSettings | EditSettings,
    *,
    seed: int = 0,
    batch_size: int = 1,
    force: bool = False,
    skip_ids: Collection[int] = (),
    processes: Processes = ONE_PROCESS,
    on_progress: ProgressFn | None = None,
) -> Iterator[Record]:
    """Refine records (from `draft` or an earlier stage), yielding refined records in input order.

    `settings` is a remasking stage (`RefineSettings`) or an editing stage (`EditSettings`, `did_cli.sampling.edit`).
    Records are batched in arrival order; a change of sequence length starts a new batch. Each record's stage
    index (its number of earlier stages) selects fresh random streams, so chained refinements never reuse them.
    The generated EOS that ends a variable-length record (`Record.terminating_eos`) is never remasked.
    `processes` splits the input positions between the processes a launcher started. Records whose id is in
    `skip_ids` (what a resumed run already has) are not yielded, and batches keep the unbroken run's layout (a
    batch that still lacks a record is refined whole), so every yielded record equals an unbroken run's.

    Raises:
        UsageError: batch_size below 1.
        InputError: a record made by another model or tokenizer (unless `force`), one this model cannot hold, or one
            without the snapshot entropy or margin the strategy ranks by (made by an earlier did).
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    needs = {"snapshot-entropy": "entropy", "snapshot-margin": "margin"}.get(getattr(settings, "remask", ""))
    skip = set(skip_ids)
    if processes.world > 1:
        records = (r for position, r in enumerate(records) if processes.owns(position))
    done = 0
    for batch in _batches(records, batch_size):
        if all(record.id in skip for record in batch):
            done += len(batch)
            continue
        for record in batch:
            check_record(record, model, tokenizer, force)
            if needs is not None and getattr(record, needs) is None:
                raise InputError(
                    f"record {record.id} carries no snapshot {needs} (made by an earlier did); --remask "
                    f"{settings.remask} ranks by it: draw the records again, or use --remask snapshot"  # type: ignore[union-attr]
                )
        refined = _refine_batch(model, tokenizer, batch, settings, seed, on_progress, done, processes.world)
        yield from (record for record in refined if record.id not in skip)
        done += len(batch)
        if on_progress is not None:
            on_progress(Progress("refine", done, None))


def _refine_batch(
    model: BD3LM,
    tokenizer: Any,
    batch: list[Record],
    settings: RefineSettings | EditSettings,
    seed: int,
    on_progress: ProgressFn | None,
    done: int,
    processes: int,
) -> list[Record]:
    stages = {len(r.stages) for r in batch}
    # Records at different stage depths are refined one by one so each keeps its own stage index.
    if len(stages) > 1:
        return [
            refined
            for record in batch
            for refined in _refine_batch(model, tokenizer, [record], settings, seed, on_progress, done, processes)
        ]
    device = model.device
    tokens = torch.tensor([r.tokens for r in batch], dtype=torch.long, device=device)
    confidence = torch.tensor([r.confidence for r in batch], dtype=torch.float32, device=device)
    # Records of earlier versions carry no snapshot entropy or margin: the refined ones then carry none either.
    measured = all(r.entropy is not None and r.margin is not None for r in batch)
    entropy = torch.tensor([r.entropy for r in batch], dtype=torch.float32, device=device) if measured else None
    margin = torch.tensor([r.margin for r in batch], dtype=torch.float32, device=device) if measured else None
    pinned = torch.zeros_like(tokens, dtype=torch.bool)
    for row, record in enumerate(batch):
        end = record.terminating_eos(tokenizer.eos_token_id)
        if end is not None:
            pinned[row, end] = True
    args = (model, tokens, confidence, [r.prompt_len for r in batch], [r.id for r in batch], stages.pop(), settings)
    common = dict(vocab_size=tokenizer_vocab_size(tokenizer), pinned=pinned, entropy=entropy, margin=margin)
    if isinstance(settings, EditSettings):
        result: Any = edit_batch(*args, seed, **common)
        changed, counts = result.edited, {"cache_calls": 0}
    else:
        if on_progress is not None:  # the stage starts (its remasking may score first): say so before its first call
            on_progress(Progress("refine", done, None, batch=len(batch)))
        result = refine_batch(*args, seed, _call_progress(on_progress, "refine", done, None, len(batch)), **common)
        changed, counts = result.remasked, {"cache_calls": result.cache_calls}
    new_tokens = result.tokens.tolist()
    new_measures = [values.tolist() for values in (result.confidence, result.entropy, result.margin)]
    base = {**stage_settings(settings, seed, tokens.shape[1]), **stage_provenance(model), "processes": processes}
    field = "edited" if isinstance(settings, EditSettings) else "remasked"
    refined = []
    for row, record in enumerate(batch):
        positions = changed[row].nonzero().flatten().tolist()
        stage = {
            **base,
            field: positions,
            # What those positions held before this stage, so a viewer can compare before and after.
            "previous_tokens": [record.tokens[i] for i in positions],
            "previous_confidence": [record.confidence[i] for i in positions],
            "nfes": result.nfes[row],
            "model_calls": result.model_calls,
            **counts,
            **(commit_stats(result.commits[row]) if field == "remasked" else {}),
            "batch_size": len(batch),
            "seconds": result.seconds / len(batch),
        }
        refined.append(
            dataclasses.replace(
                record,
                tokens=new_tokens[row],
                confidence=_round7(new_measures[0][row]),
                entropy=_round7(new_measures[1][row]) if measured else None,
                margin=_round7(new_measures[2][row]) if measured else None,
                text=tokenizer.decode(new_tokens[row][record.prompt_len :]),
                draft_tokens=record.draft_tokens or record.tokens,
                stages=[*record.stages, stage],
                versions=versions(),
            )
        )
    return refined


def generate(
    model: BD3LM,
    tokenizer: Any,
    draft_settings: DraftSettings,
    refine_settings: list[RefineSettings | EditSettings],
    *,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 1,
    prompts: list[str] | None = None,
    skip_ids: Collection[int] = (),
    processes: Processes = ONE_PROCESS,
    on_progress: ProgressFn | None = None,
) -> Iterator[Record]:
    """Draft, then run each refinement stage in turn: the same records `draft | refine | refine` would write.

    `processes` splits the drafts between processes; each process refines its own drafts. `skip_ids` works as in
    `draft`: whole batches are drafted and refined, only the missing records are yielded. `on_progress` hears from
    every stage, each event saying which stage runs (`Progress.stage_index` of `Progress.stages`).
    """
    skip = set(skip_ids)
    staged = _StagedProgress(on_progress, 1 + len(refine_settings)) if on_progress is not None else None
    on_draft = staged.draft if staged is not None else None
    batches = _draft_batches(
        model, tokenizer, draft_settings, num_samples, seed, batch_size, prompts, skip, processes, on_draft
    )
    for batch in batches:
        records: Iterable[Record] = batch
        for index, settings in enumerate(refine_settings, start=1):
            progress = staged.refine(index) if staged is not None else None
            records = [
                refined
                for chunk in _batches(records, batch_size)
                for refined in _refine_batch(model, tokenizer, chunk, settings, seed, progress, 0, processes.world)
            ]
        yield from (record for record in records if record.id not in skip)


def check_record(record: Record, model: BD3LM, tokenizer: Any, force: bool = False) -> None:
    """Refuse a record this model cannot continue: another model or vocabulary (unless forced), bad ids or length."""
    where = f"record {record.id}"
    ours = model_info(model).get("sha256")
    theirs = (record.model or {}).get("sha256")
    if not force and ours and theirs and ours != theirs:
        raise InputError(
            f"{where} was made by model {record.model.get('name')} ({theirs[:12]}), not {model_info(model)['name']} "
            f"({ours[:12]}); pass --force to refine it anyway"
        )
    vocab = (record.tokenizer or {}).get("vocab_size")
    if not force and vocab is not None and vocab != len(tokenizer):
        raise InputError(f"{where} used a tokenizer of {vocab} tokens, this one has {len(tokenizer)}; pass --force")
    if len(record.tokens) > model.config.model_length:
        raise InputError(f"{where} has {len(record.tokens)} tokens, more than the model's {model.config.model_length}")
    if record.draft_tokens is not None and len(record.draft_tokens) != len(record.tokens):
        raise InputError(f"{where} has draft_tokens of another length than its tokens")
    if any(t >= len(tokenizer) or t == model.mask_id for t in record.tokens):
        raise InputError(f"{where} holds token ids outside the tokenizer's vocabulary (or [MASK])")


def _batches(records: Iterable[Record], batch_size: int) -> Iterator[list[Record]]:
    # A full batch is yielded at once, without waiting for the next record, so a pipe streams sample by sample.
    batch: list[Record] = []
    for record in records:
        if batch and len(record.tokens) != len(batch[0].tokens):
            yield batch
            batch = []
        batch.append(record)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _call_progress(
    on_progress: ProgressFn | None, stage: str, done: int, total: int | None, batch: int
) -> Callable[[int, int], None] | None:
    """A stage's per-call callback reporting its tokens and calls on a batch of `batch` samples, or None."""
    if on_progress is None:
        return None
    calls = 0

    def on_call(tokens_done: int, tokens_total: int) -> None:
        nonlocal calls
        calls += 1  # the sampler reports once per model call
        on_progress(Progress(stage, done, total, tokens_done, tokens_total, calls, batch))

    return on_call


class _StagedProgress:
    """`generate`'s progress: every event names its stage's place in the schedule and carries the run's sample counts.

    Refine stages see one batch at a time and know nothing of the run, so their events take the counts the draft's
    last event gave.
    """

    def __init__(self, on_progress: ProgressFn, stages: int) -> None:
        self.on_progress, self.stages = on_progress, stages
        self.samples_done, self.batch = 0, 0
        self.samples_total: int | None = None

    def draft(self, event: Progress) -> None:
        self.samples_done, self.samples_total = event.samples_done, event.samples_total
        self.batch = event.batch
        self.on_progress(dataclasses.replace(event, stages=self.stages))

    def refine(self, index: int) -> ProgressFn:
        """The callback of refine stage `index` (1 for the first refinement)."""

        def forward(event: Progress) -> None:
            counts = dict(samples_done=self.samples_done, samples_total=self.samples_total, batch=self.batch)
            self.on_progress(dataclasses.replace(event, **counts, stage_index=index, stages=self.stages))

        return forward
