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
from did_cli.compile import optimize
from did_cli.config import DraftSettings, RefineSettings
from did_cli.distributed import ONE_PROCESS, Shard
from did_cli.errors import InputError, UsageError
from did_cli.evaluation import eval_ppl
from did_cli.likelihood import eval_nll
from did_cli.model import BD3LM
from did_cli.provenance import device_info, model_info, tokenizer_info, versions
from did_cli.records import Record
from did_cli.sampling.draft import draft as draft_batch
from did_cli.sampling.refine import refine as refine_batch
from did_cli.training.loop import finetune

__all__ = [
    "Progress",
    "draft",
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


def __getattr__(name: str) -> Any:
    # did_cli.sweep builds on this module; re-exporting its entry point lazily avoids an import cycle.
    if name == "run_sweep":
        from did_cli.sweep import run_sweep

        return run_sweep
    raise AttributeError(f"module 'did_cli.api' has no attribute {name!r}")


@dataclass
class Progress:
    """A progress report: which stage, how many samples are finished, and token counts for the current batch."""

    stage: str
    samples_done: int
    samples_total: int | None
    tokens_done: int = 0
    tokens_total: int = 0


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


def draft_stage_settings(settings: DraftSettings, seed: int) -> dict[str, Any]:
    """The settings a draft stage records: what must agree for two drafts to be the same samples."""
    return {
        "kind": "draft",
        "length": settings.length,
        "block_size": settings.block_size,
        "kv_cache": settings.kv_cache,
        **dataclasses.asdict(settings.unmasking),
        "reject_entropy": settings.reject_entropy,
        "max_tries": settings.max_tries,
        "var_length": settings.var_length,
        "seed": seed,
    }


def refine_stage_settings(settings: RefineSettings, seed: int, length: int) -> dict[str, Any]:
    """The settings a refine stage records (`length` resolves B2 = None to the whole sequence)."""
    return {
        "kind": "refine",
        "block_size": settings.block_size or length,
        "gamma": settings.gamma,
        "remask": settings.remask,
        "kv_cache": settings.kv_cache,
        **dataclasses.asdict(settings.unmasking),
        "refine_cache": settings.refine_cache,
        "seed": seed,
    }


# Stage keys added after records were first written, with the value every earlier record was made with.
_STAGE_DEFAULTS = {"refine_cache": 1}


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
    shard: Shard = ONE_PROCESS,
    on_progress: ProgressFn | None = None,
) -> Iterator[Record]:
    """Draft `num_samples` samples per prompt (or unconditionally), yielding each record when its batch finishes.

    Sample ids run from 0 in order (prompt by prompt); sample `id` depends only on (seed, id), so any batch size
    gives the same tokens (confidences agree to float rounding, see README) and `skip_ids` (samples a resumed run
    already has) can be left out without changing the others; `shard` keeps the ids this process draws when several
    share the work. Work is produced lazily: a huge `num_samples` costs no memory up front.

    Raises:
        UsageError: num_samples or batch_size below 1, length above the model's, a prompt that fills the length.
    """
    if num_samples < 1:
        raise UsageError(f"num_samples must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    encoded = encode_prompts(tokenizer, prompts)
    _check_draft_inputs(model, settings, encoded)
    total = num_samples * len(encoded)
    # (id, prompt text, prompt ids), made as they are consumed
    jobs = ((i, *encoded[i // num_samples]) for i in range(total) if shard.owns(i) and i not in skip_ids)
    provenance = _provenance(model, tokenizer)
    stage_settings = {**draft_stage_settings(settings, seed), **_stage_provenance(model), "processes": shard.world}
    done = sum(1 for i in set(skip_ids) if 0 <= i < total and shard.owns(i))  # what a resumed run already has
    vocab_size = tokenizer_vocab_size(tokenizer)
    while batch := list(itertools.islice(jobs, batch_size)):
        on_call = _call_progress(on_progress, "draft", done, total)
        result = draft_batch(
            model,
            [ids for _, _, ids in batch],
            [i for i, _, _ in batch],
            settings,
            seed,
            on_call,
            eos_id=tokenizer.eos_token_id,
            vocab_size=vocab_size,
        )
        # A variable-length sample ends at its own length; the rest of its row is unused.
        tokens = [row[:n] for row, n in zip(result.tokens.tolist(), result.lengths, strict=True)]
        confidence = [row[:n] for row, n in zip(result.confidence.tolist(), result.lengths, strict=True)]
        for row, (sample_id, text, _) in enumerate(batch):
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
            yield Record(
                id=sample_id,
                seed=seed,
                tokens=tokens[row],
                confidence=_round7(confidence[row]),
                prompt_len=prompt_len,
                prompt=text,
                text=tokenizer.decode(tokens[row][prompt_len:]),
                draft_tokens=tokens[row],
                stages=[stage],
                **provenance,
            )
        done += len(batch)
        if on_progress is not None:
            on_progress(Progress("draft", done, total))


def refine(
    model: BD3LM,
    tokenizer: Any,
    records: Iterable[Record],
    settings: RefineSettings,
    *,
    seed: int = 0,
    batch_size: int = 1,
    force: bool = False,
    skip_ids: Collection[int] = (),
    shard: Shard = ONE_PROCESS,
    processes: int | None = None,
    on_progress: ProgressFn | None = None,
) -> Iterator[Record]:
    """Refine records (from `draft` or an earlier `refine`), yielding refined records in input order.

    Records are batched in arrival order; a change of sequence length starts a new batch. Each record's stage
    index (its number of earlier stages) selects fresh random streams, so chained refinements never reuse them.
    Records whose id is in `skip_ids` (what a resumed run already has) are passed over, and so are the input
    positions another process owns (`shard`). `processes` (default `shard.world`) is recorded in the stage as
    information; it never changes a token.

    Raises:
        UsageError: batch_size below 1.
        InputError: a record made by another model or tokenizer (unless `force`), or one this model cannot hold.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if shard.world > 1:
        records = (r for position, r in enumerate(records) if shard.owns(position))
    if skip_ids:
        records = (r for r in records if r.id not in skip_ids)
    done = 0
    for batch in _batches(records, batch_size):
        for record in batch:
            check_record(record, model, tokenizer, force)
        yield from _refine_batch(model, tokenizer, batch, settings, seed, on_progress, done, processes or shard.world)
        done += len(batch)
        if on_progress is not None:
            on_progress(Progress("refine", done, None))


def _refine_batch(
    model: BD3LM,
    tokenizer: Any,
    batch: list[Record],
    settings: RefineSettings,
    seed: int,
    on_progress: ProgressFn | None,
    done: int,
    processes: int,
) -> Iterator[Record]:
    device = model.device
    tokens = torch.tensor([r.tokens for r in batch], dtype=torch.long, device=device)
    confidence = torch.tensor([r.confidence for r in batch], dtype=torch.float32, device=device)
    stages = {len(r.stages) for r in batch}
    # Records at different stage depths are refined one by one so each keeps its own stage index.
    if len(stages) > 1:
        for record in batch:
            yield from _refine_batch(model, tokenizer, [record], settings, seed, on_progress, done, processes)
        return
    stage_index = stages.pop()
    result = refine_batch(
        model,
        tokens,
        confidence,
        [r.prompt_len for r in batch],
        [r.id for r in batch],
        stage_index,
        settings,
        seed,
        _call_progress(on_progress, "refine", done, None),
        vocab_size=tokenizer_vocab_size(tokenizer),
    )
    new_tokens, new_confidence = result.tokens.tolist(), result.confidence.tolist()
    stage_settings = {**refine_stage_settings(settings, seed, tokens.shape[1]), **_stage_provenance(model)}
    stage_settings["processes"] = processes
    for row, record in enumerate(batch):
        remasked = result.remasked[row].nonzero().flatten().tolist()
        stage = {
            **stage_settings,
            "remasked": remasked,
            # What the remasked positions held before this stage, so a viewer can compare before and after.
            "previous_tokens": [record.tokens[i] for i in remasked],
            "previous_confidence": [record.confidence[i] for i in remasked],
            "nfes": result.nfes[row],
            "model_calls": result.model_calls,
            "cache_calls": result.cache_calls,
            **commit_stats(result.commits[row]),
            "batch_size": len(batch),
            "seconds": result.seconds / len(batch),
        }
        yield dataclasses.replace(
            record,
            tokens=new_tokens[row],
            confidence=_round7(new_confidence[row]),
            text=tokenizer.decode(new_tokens[row][record.prompt_len :]),
            draft_tokens=record.draft_tokens or record.tokens,
            stages=[*record.stages, stage],
            versions=versions(),
        )


def generate(
    model: BD3LM,
    tokenizer: Any,
    draft_settings: DraftSettings,
    refine_settings: list[RefineSettings],
    *,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 1,
    prompts: list[str] | None = None,
    skip_ids: Collection[int] = (),
    shard: Shard = ONE_PROCESS,
    on_progress: ProgressFn | None = None,
) -> Iterator[Record]:
    """Draft, then run each refinement stage in turn: the same records `draft | refine | refine` would write.

    `shard` splits the drafts between processes; each process refines its own drafts.
    """
    drafts = draft(
        model,
        tokenizer,
        draft_settings,
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        prompts=prompts,
        skip_ids=skip_ids,
        shard=shard,
        on_progress=on_progress,
    )
    for batch in _batches(drafts, batch_size):
        records: Iterable[Record] = batch
        for settings in refine_settings:
            records = list(
                refine(model, tokenizer, records, settings, seed=seed, batch_size=batch_size, processes=shard.world)
            )
        yield from records


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


def check_resumable(kept: list[Record], expected_stages: list[dict[str, Any]], model: BD3LM) -> set[int]:
    """The ids of records a resumed run keeps, after checking they were made as this run would make them.

    `expected_stages` are the settings of the stages this run adds (`draft_stage_settings`, `refine_stage_settings`);
    each kept record's last stages must agree on every key, and on the model's weights.

    Raises:
        InputError: the first difference, named, so the user can rerun with the old settings or start afresh.
    """
    ours = model_info(model).get("sha256")
    provenance = {key: _stage_provenance(model)[key] for key in ("dtype", "kv_cache_dtype")}
    for record in kept:
        stages = record.stages[-len(expected_stages) :] if expected_stages else []
        if len(stages) != len(expected_stages):
            raise InputError(f"cannot resume: sample {record.id} has {len(record.stages)} stages, this run makes more")
        for stage, expected in zip(stages, expected_stages, strict=True):
            for key, value in expected.items():
                if stage.get(key, _STAGE_DEFAULTS.get(key)) != value:
                    raise InputError(
                        f"cannot resume: sample {record.id} was made with {stage.get('kind')} {key}="
                        f"{stage.get(key)!r}, this run uses {value!r}"
                    )
            theirs = (stage.get("model") or record.model or {}).get("sha256")
            if ours and theirs and theirs != ours:
                raise InputError(f"cannot resume: sample {record.id} was made by other weights ({theirs[:12]})")
            # Numerics change tokens in bf16: a file mixing dtypes would not be one run's samples.
            for key, value in provenance.items():
                if stage.get(key, value) != value:  # records older than the key pass
                    raise InputError(
                        f"cannot resume: sample {record.id} was made with {key} {stage[key]}, this run uses {value}"
                    )
    return {record.id for record in kept}


def _stage_provenance(model: BD3LM) -> dict[str, Any]:
    # Per stage, because a refinement may run another model (with --force), dtype or device than the draft did.
    info = model_info(model)
    return {
        "model": {key: info[key] for key in ("name", "path", "sha256") if key in info},
        "device": device_info(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        # The dtype of this stage's KV cache (cached calls only): bfloat16 under float32 weights is BD3-LM's numerics.
        "kv_cache_dtype": str(model.kv_cache_dtype or model.dtype).removeprefix("torch."),
    }


def _provenance(model: BD3LM, tokenizer: Any) -> dict[str, Any]:
    return {
        "model": model_info(model),
        "tokenizer": tokenizer_info(tokenizer),
        "versions": versions(),
        "device": device_info(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def _call_progress(on_progress: ProgressFn | None, stage: str, done: int, total: int | None):
    if on_progress is None:
        return None

    def on_call(tokens_done: int, tokens_total: int) -> None:
        on_progress(Progress(stage, done, total, tokens_done, tokens_total))

    return on_call
