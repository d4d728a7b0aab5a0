"""The paper's ablations in one call: draft once per model, refine the same drafts per variant, score every file.

`run_sweep` runs the ablations of Diffusion in Diffusion (arXiv 2601.13599; research notes §1.2–1.4 and §3.2) on
any model and judge, and `did_cli.report` turns the scores into the paper's tables:

* remask strategy (`remask`): no refinement (the draft), random, post-hoc and snapshot confidence;
* remask fraction γ (`gamma`): a U-curve in the paper, best at 0.25–0.5 and exploding as γ → 1;
* refine block size B2 (`refine_block_size`): only a global block (B2 = L) helps in the paper;
* NFEs against gen PPL: the speed–quality trade-off;
* cheaper refinement (`confidence_thresholds`, `refine_caches`): threshold commits and reused kept keys/values at
  the base strategy and γ with a global block, every combination, so the frontier of gen PPL against NFEs and
  seconds per sample holds draft-only, exact and each accelerated refinement.
* the draft frontier (`draft_top_ps`, `draft_temperatures`): extra drafts at sharper or flatter sampling, scored but
  never refined, so every refined variant is read at matched entropy (`did_cli.entropy_matched`): better text, or
  only less diverse text?
* MAUVE of every scored file against reference texts (`reference`, `did_cli.mauve`), added to finished rows later
  without sampling or scoring again.

Design choices:

* Every variant refines the *same* drafts (one draft per model, fixed seed and B1), and refinement randomness
  depends only on (seed, sample id, stage), so variants differ by their settings alone. Such common random numbers
  make differences between variants visible with few samples.
* One axis at a time around the base point (snapshot, γ = 0.5, B2 = L): every strategy at the base γ and B2 (the
  strategy ablation), then the base strategy alone over the γ values at the base B2 and over the B2 values at the
  base γ. `grid=True` runs every (strategy, γ, B2) combination instead.
* Sample files are keyed by their settings: each model's files live in a folder named by a short hash of everything
  that determines the drafts (weights, L, B1, samples, seed, dtype, unmasking, cache), so a run with other settings
  writes new files and a results row never cites a file that a later run changed.
* The judge is loaded (or its absence reported) before any drafting, unless every variant is already scored.
* Resumable at two levels. A variant with a row in `results.jsonl` for the same configuration is not touched. A
  sample file that is complete and matches its settings (and, for a refinement, the current drafts) is scored
  without sampling again. Sample files are written line by line and results rows appended one at a time, so an
  interrupted run redoes at most the file it was writing.
* Models and the judge load only when something needs them, so re-running a finished sweep loads nothing and only
  rewrites the report.

Layout of the output folder: `<label>/<settings hash>/draft.jsonl` and `<label>/<settings hash>/<variant>.jsonl`
(sample records), `results.jsonl` (one row per scored file, appended), `report.md` and its plots.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from did_cli import api
from did_cli.checkpoints import file_sha256, load_model, load_tokenizer, parse_dtype, read_config, resolve
from did_cli.config import DraftSettings, RefineSettings, UnmaskingSettings
from did_cli.distributed import Processes
from did_cli.errors import InputError, UsageError
from did_cli.evaluation import (
    DEFAULT_JUDGE,
    EvalSettings,
    FileResult,
    Judge,
    Sample,
    load_judge,
    read_reference,
    score_samples,
    summarize,
)
from did_cli.mauve import INSTALL_HINT, MauveSettings, default_buckets, mauve_available, mauve_scorer
from did_cli.provenance import versions
from did_cli.records import Record, RecordWriter, read_records
from did_cli.report import RESULTS, append_result, read_results, write_report
from did_cli.sampling.remask import canonical_remask
from did_cli.training import run_folder

__all__ = [
    "ModelSpec",
    "SweepEvent",
    "SweepResult",
    "SweepSettings",
    "Variant",
    "frontier_variants",
    "parse_model",
    "plan_variants",
    "refine_block_sizes",
    "result_row",
    "run_sweep",
    "samples_key",
]

DEFAULT_REFINE_BLOCK_SIZES = (16, 64)  # and L: the paper's global block
BASE_REMASK = "snapshot"  # the strategy of the base point, swept over γ and B2 (the paper's)
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Training runs end in generic folder names; the run's own folder says which model it is.
_GENERIC = re.compile(r"final|last|latest|(checkpoint|step)[-_]?\d*")
# The weights file of a did or BD3-LM checkpoint folder (see did_cli.checkpoints).
_WEIGHTS = "model.safetensors"


# --- Settings and the plan: pure --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model to sweep: `label` names its folder and its columns in the report; `path` is what `load_model` takes."""

    label: str
    path: str


def parse_model(text: str) -> ModelSpec:
    """`label=path`, or a bare name or path labelled by its last component (`runs/a/final` → `a-final`).

    Raises:
        UsageError: an empty path, or a label that is not a plain folder name.
    """
    label, sep, path = text.partition("=")
    if sep and label and "/" not in label:
        if not _LABEL.fullmatch(label):
            raise UsageError(f"model label {label!r} must be letters, digits, '.', '_' or '-' (as in mix=runs/a)")
        if not path:
            raise UsageError(f"--model {text!r} gives a label but no model")
        return ModelSpec(label, path)
    parts = [part for part in re.split(r"[\\/]", text) if part not in ("", ".", "..")]
    if not parts:
        raise UsageError(f"--model {text!r} names no model")
    name = f"{parts[-2]}-{parts[-1]}" if len(parts) > 1 and _GENERIC.fullmatch(parts[-1]) else parts[-1]
    label = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")
    if not label:
        raise UsageError(f"cannot make a label from --model {text!r}; pass it as label=path")
    return ModelSpec(label, text)


@dataclass(frozen=True)
class Variant:
    """One refinement of the drafts, or the draft itself (`remask` None).

    Attributes:
        remask: snapshot, posthoc or random; None for the draft without refinement.
        gamma: fraction γ of generated tokens remasked.
        refine_block_size: B2 resolved against the length: L means one global block.
        confidence_threshold: commit every position above it per call (confidence order); None: the sweep's order.
        refine_cache: R, kept positions' keys/values recomputed every R calls (1: exact).
        top_p: for a draft of the draft frontier, its nucleus mass (None: the sweep's).
        temperature: for a draft of the draft frontier, its temperature (None: the sweep's).
    """

    remask: str | None = None
    gamma: float | None = None
    refine_block_size: int | None = None
    confidence_threshold: float | None = None
    refine_cache: int = 1
    top_p: float | None = None
    temperature: float | None = None

    @property
    def id(self) -> str:
        """File and row name: `draft`, `draft-p0.8-temp0.7` (draft frontier), or e.g. `snapshot-g0.5-b1024`.

        Cheaper refinements add `-t0.9` (threshold) and `-r4` (R).
        """
        if self.remask is None:
            name = "draft" + (f"-p{self.top_p:.10g}" if self.top_p is not None else "")
            return name + (f"-temp{self.temperature:.10g}" if self.temperature is not None else "")
        name = f"{self.remask}-g{self.gamma:.10g}-b{self.refine_block_size}"
        if self.confidence_threshold is not None:
            name += f"-t{self.confidence_threshold:.10g}"
        return name + (f"-r{self.refine_cache}" if self.refine_cache > 1 else "")

    @property
    def exact(self) -> bool:
        """Whether this is the draft or an exact refinement (no threshold commits, no reused keys/values)."""
        return self.confidence_threshold is None and self.refine_cache == 1

    @property
    def frontier(self) -> bool:
        """Whether this is a draft at other sampling settings than the sweep's, drawn only for the draft frontier."""
        return self.remask is None and (self.top_p is not None or self.temperature is not None)

    def unmasking(self, base: UnmaskingSettings) -> UnmaskingSettings:
        """The variant's unmasking: the sweep's, or its own where it differs.

        A draft-frontier variant has its own nucleus and temperature, a cheaper refinement confidence order with its
        threshold.
        """
        if self.frontier:
            overrides = {"top_p": self.top_p, "temperature": self.temperature}
            return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
        if self.confidence_threshold is None:
            return base
        return dataclasses.replace(
            base,
            order="confidence",
            steps_per_block=None,
            tokens_per_call=1,
            confidence_threshold=self.confidence_threshold,
        )


DRAFT = Variant()


def frontier_variants(top_ps: Sequence[float], temperatures: Sequence[float], base: UnmaskingSettings) -> list[Variant]:
    """Drafts of the draft frontier: every (top-p, temperature) pair of the axes except the sweep's own setting.

    The sweep's draft (`DRAFT`, the one every variant refines) is the frontier's point at the base setting; an axis
    left empty stays at the base value. Only the value that differs from the base is named in a variant's id.

    Args:
        top_ps: nucleus masses of the frontier (empty: the base only).
        temperatures: temperatures of the frontier (empty: the base only).
        base: the sweep's unmasking, whose top-p and temperature the refined variants' drafts use.
    """
    variants = []
    for top_p in dict.fromkeys(float(p) for p in (top_ps or (base.top_p,))):
        for temperature in dict.fromkeys(float(t) for t in (temperatures or (base.temperature,))):
            if math.isclose(top_p, base.top_p) and math.isclose(temperature, base.temperature):
                continue
            variants.append(
                Variant(
                    top_p=None if math.isclose(top_p, base.top_p) else top_p,
                    temperature=None if math.isclose(temperature, base.temperature) else temperature,
                )
            )
    return variants


def refine_block_sizes(sizes: Sequence[int] | None, length: int) -> tuple[list[int], list[str]]:
    """B2 values resolved against the length L, ascending: sizes >= L become L (one global block), once each.

    The default (16, 64 and L) drops sizes that do not divide L, with a note, because nobody asked for them. An
    explicit size that does not divide L is an error, because skipping a requested row would hide it.

    Args:
        sizes: requested B2 values, or None for the default.
        length: the sequence length L.

    Returns:
        (sizes, notes): the B2 values to run and one line per dropped default.

    Raises:
        UsageError: an explicit size that is not positive or does not divide L.
    """
    notes = []
    candidates = [*DEFAULT_REFINE_BLOCK_SIZES, length] if sizes is None else list(sizes)
    kept = set()
    for size in candidates:
        if size < 1:
            raise UsageError(f"--refine-block-size must be positive, got {size}")
        if size < length and length % size:
            if sizes is not None:
                raise UsageError(f"--refine-block-size {size} does not divide the length {length}")
            notes.append(f"default refine block size {size} does not divide L = {length}; left out")
            continue
        kept.add(min(size, length))
    return sorted(kept), notes


def plan_variants(
    remask: Sequence[str],
    gammas: Sequence[float],
    block_sizes: Sequence[int],
    *,
    base_gamma: float,
    base_block_size: int,
    grid: bool = False,
    base_remask: str = BASE_REMASK,
    confidence_thresholds: Sequence[float] = (),
    refine_caches: Sequence[int] = (),
    length: int | None = None,
) -> list[Variant]:
    """The draft, every strategy at the base point, then the base strategy's γ slice and B2 slice: one axis at a time.

    The base point (base strategy, base γ, base B2) is where the strategy ablation is read; the γ slice runs at the
    base B2 and the B2 slice at the base γ, for the base strategy only (snapshot, or the first listed when snapshot
    is not). With `grid` every (strategy, γ, B2) combination is run.

    Args:
        remask: strategies, in the order to run them.
        gammas: γ values of the γ slice.
        block_sizes: resolved B2 values (see `refine_block_sizes`).
        base_gamma: γ of the B2 slice and of the strategy ablation.
        base_block_size: resolved B2 of the γ slice and of the strategy ablation.
        grid: run the full product instead of the slices.
        base_remask: the strategy swept over γ and B2.
        confidence_thresholds: thresholds of cheaper refinements (each with each R, and alone).
        refine_caches: R values of cheaper refinements (1 means none; each with each threshold, and alone).
        length: L, the global block of cheaper refinements (default: the largest of `block_sizes`).

    Returns:
        Distinct variants, the draft first, cheaper refinements (at the base strategy and γ, B2 = L) last.
    """
    base_point = [Variant(strategy, float(base_gamma), base_block_size) for strategy in remask]
    if grid:
        pairs = [(gamma, size) for size in block_sizes for gamma in gammas]
        slices = [Variant(strategy, float(gamma), size) for strategy in remask for gamma, size in pairs]
    else:
        swept = base_remask if base_remask in remask else remask[0]
        pairs = [(gamma, base_block_size) for gamma in gammas] + [(base_gamma, size) for size in block_sizes]
        slices = [Variant(swept, float(gamma), size) for gamma, size in pairs]
    swept = base_remask if base_remask in remask else remask[0]
    global_size = length if length is not None else max(block_sizes, default=base_block_size)
    cheaper = [
        Variant(swept, float(base_gamma), global_size, threshold, r)
        for threshold in (None, *(float(t) for t in confidence_thresholds))
        for r in dict.fromkeys((1, *refine_caches))
        if threshold is not None or r > 1
    ]
    if cheaper:
        cheaper.insert(0, Variant(swept, float(base_gamma), global_size))  # the exact refinement they are read against
    return [DRAFT, *dict.fromkeys([*base_point, *slices, *cheaper])]


@dataclass(frozen=True)
class SweepSettings:
    """One `did sweep`: which models, which variants, how many samples, where the results go.

    Attributes:
        models: model names or paths, optionally labelled (`mix=runs/a/final`); labels name folders and columns.
        judge: judge LM for gen PPL (`gpt2-large` as published, `did-tiny-judge`, or a folder).
        out: output folder; running again with the same folder resumes.
        num_samples: samples per variant (the same drafts for every variant of a model).
        length: sequence length L incl. BOS (default: each model's length).
        draft_block_size: B1 of the draft.
        remask: strategies to compare (each is also swept over γ and B2).
        gammas: γ values of the γ sweep.
        refine_block_sizes: B2 values of the B2 sweep; values >= L mean one global block. None: 16, 64 and L.
        base_gamma: γ where the strategy ablation and the B2 sweep are read.
        base_refine_block_size: B2 where the strategy ablation and the γ sweep are read (None: L, global).
        grid: run every (strategy, γ, B2) combination instead of one-axis-at-a-time slices.
        seed: seed of the drafts and of every refinement.
        kv_cache: draft with the KV cache (False recomputes the prefix at every call, the slow oracle).
        batch_size: samples per model call (never changes the samples).
        device: where the models and the judge run.
        dtype: weights dtype of the models; the judge scores in float32, as upstream.
        unmasking: how draft and refinement commit tokens (BD3-LM's first-hitting sampler, nucleus 0.9).
        evaluation: judge context, stride, batch size and degenerate-entropy threshold.
        confidence_thresholds: cheaper refinements committing every position above each threshold per call
            (confidence order), at the base strategy and γ with a global block.
        refine_caches: cheaper refinements reusing kept positions' keys/values for R calls, likewise (1: exact).
        draft_top_ps: nucleus masses of the draft frontier: extra drafts (never refined) at each value, crossed with
            `draft_temperatures`, so refined variants can be read at matched entropy (`did_cli.entropy_matched`).
            The sweep's own draft, at `unmasking.top_p`, is always a point of it. Empty: no frontier along top-p.
        draft_temperatures: temperatures of the draft frontier, likewise.
        reference: reference texts (JSONL with a text field, sample records, or .txt one per line) for MAUVE of every
            scored file against them, with the judge's features (`did_cli.mauve`); None: no MAUVE. Added to existing
            rows without sampling or scoring again; skipped with a note when mauve-text is not installed.
    """

    models: Sequence[str]
    judge: str = DEFAULT_JUDGE
    out: str | Path = "sweep"
    num_samples: int = 64
    length: int | None = None
    draft_block_size: int = 4
    remask: Sequence[str] = ("snapshot", "posthoc", "random")
    gammas: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 1.0)
    refine_block_sizes: Sequence[int] | None = None
    base_gamma: float = 0.5
    base_refine_block_size: int | None = None
    grid: bool = False
    seed: int = 0
    kv_cache: bool = True
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    unmasking: UnmaskingSettings = field(default_factory=UnmaskingSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    confidence_thresholds: Sequence[float] = ()
    refine_caches: Sequence[int] = ()
    draft_top_ps: Sequence[float] = ()
    draft_temperatures: Sequence[float] = ()
    reference: str | Path | None = None

    def __post_init__(self) -> None:
        # Lists from Python callers become tuples, so the settings stay hashable and cannot change under a run.
        names = ("models", "remask", "gammas", "refine_block_sizes", "confidence_thresholds", "refine_caches")
        for name in (*names, "draft_top_ps", "draft_temperatures"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if not self.models:
            raise UsageError("give at least one --model")
        labels = [spec.label for spec in self.model_specs]
        repeated = next((label for label in labels if labels.count(label) > 1), None)
        if repeated is not None:
            raise UsageError(f"two models get the label {repeated!r}; name them, e.g. --model a={repeated}")
        if self.num_samples < 1 or self.batch_size < 1:
            raise UsageError("--num-samples and --batch-size must be at least 1")
        if not self.remask or not self.gammas:
            raise UsageError("give at least one --remask strategy and one --gamma")
        object.__setattr__(self, "remask", tuple(dict.fromkeys(canonical_remask(s) for s in self.remask)))
        for gamma in (*self.gammas, self.base_gamma):
            if not 0.0 <= gamma <= 1.0:
                raise UsageError(f"--gamma must be in [0, 1], got {gamma}")
        if self.length is not None:
            DraftSettings(self.length, self.draft_block_size)
        elif self.draft_block_size < 1:
            raise UsageError(f"--draft-block-size must be positive, got {self.draft_block_size}")
        parse_dtype(self.dtype)
        for threshold in self.confidence_thresholds:
            UnmaskingSettings(order="confidence", confidence_threshold=threshold, top_p=self.unmasking.top_p)
        for r in self.refine_caches:
            RefineSettings(refine_cache=r)
        for top_p in self.draft_top_ps:
            UnmaskingSettings(top_p=top_p)
        for temperature in self.draft_temperatures:
            UnmaskingSettings(temperature=temperature)
        if self.reference is not None and self.num_samples < 2:
            raise UsageError("MAUVE (--reference) needs --num-samples of at least 2")

    @property
    def model_specs(self) -> list[ModelSpec]:
        """The models with their labels."""
        return [parse_model(text) for text in self.models]


# --- Running ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepEvent:
    """What the sweep is doing, for a progress display; `run_sweep` itself never prints.

    Attributes:
        kind: `note` (a line worth telling the user), `step` (variant `step` of `steps` starts; `step == steps`
            when the sweep is finished) or `progress` (within a step: `done` of `total` `unit`s).
        message: what is happening, e.g. `mix: refine snapshot-g0.5-b1024`.
        step: variants finished so far.
        steps: variants in the sweep.
        done: units finished in this step.
        total: units in this step, when known.
        unit: `samples` or `windows`.
    """

    kind: str
    message: str
    step: int = 0
    steps: int = 0
    done: int = 0
    total: int | None = None
    unit: str = ""


EventFn = Callable[[SweepEvent], None]


@dataclass
class SweepResult:
    """What a sweep did.

    Attributes:
        rows: one results row per (model, variant) of this sweep, in plan order (reused rows included).
        report: the written `report.md`.
        plots: the PNG plots written (empty without matplotlib).
        drafted: draft files sampled in this run (not reused).
        refined: refined files sampled in this run.
        scored: files scored with the judge in this run.
        reused: variants whose results were already in `results.jsonl`.
        verdicts: per model with a draft frontier, one line saying which refined variants beat it at matched entropy.
    """

    rows: list[dict[str, Any]]
    report: Path
    plots: list[Path]
    drafted: int = 0
    refined: int = 0
    scored: int = 0
    reused: int = 0
    verdicts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _ModelPlan:
    spec: ModelSpec
    draft: DraftSettings
    variants: list[Variant]
    config: dict[str, Any]  # everything besides the variant that determines a row's numbers
    notes: list[str]

    @property
    def folder(self) -> str:
        """`<label>/<hash>`: where this plan's sample files live, named by what determines the drafts."""
        return f"{self.spec.label}/{samples_key(self.config)}"


# What determines a model's drafts (and, with each variant's own settings, its refinements).
_SAMPLE_KEYS = ("sha256", "length", "draft_block_size", "num_samples", "seed", "dtype", "unmasking", "kv_cache")


def samples_key(config: dict[str, Any]) -> str:
    """A short hash of the settings that determine a model's sample files (its drafts and their refinements)."""
    body = json.dumps({key: config.get(key) for key in _SAMPLE_KEYS}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:10]


ONE_LAUNCH = Processes()


def run_sweep(
    settings: SweepSettings, on_event: EventFn | None = None, processes: Processes = ONE_LAUNCH
) -> SweepResult:
    """Draft, refine and score every variant of every model, append the rows to `results.jsonl`, write the report.

    Every model and size is checked before anything runs, so bad input fails before minutes of sampling.

    Args:
        settings: models, variants, samples and output folder.
        on_event: called with each SweepEvent (notes, steps, per-sample and per-window progress), on the main
            process only.
        processes: with several processes (`accelerate launch`), each draws, refines and scores its share of the
            samples; the main process reads and writes every file, so the files and rows equal a one-process run.

    Returns:
        The rows of this sweep, the report and plot paths, and how much was computed versus reused.

    Raises:
        UsageError: sizes that do not fit a model (a length beyond the model's, a B2 that does not divide L).
        ModelLoadError: a model or the judge cannot be found.
    """
    emit = on_event if on_event is not None and processes.shard.is_main else (lambda event: None)
    out = Path(settings.out)
    references = _read_references(settings.reference)  # a broken reference fails before any model is looked up
    plans = [_plan_model(spec, settings) for spec in settings.model_specs]
    # One sweep per folder at a time: a second would redo the first one's work and collide on its files.
    with run_folder.locked(out, take=processes.shard.is_main, what="did sweep"):
        return _run_locked(settings, out, plans, references, emit, processes)


def _run_locked(
    settings: SweepSettings,
    out: Path,
    plans: list[_ModelPlan],
    references: tuple[str, str, list[str]] | None,
    emit: EventFn,
    processes: Processes,
) -> SweepResult:
    """`run_sweep`'s work, with the output folder locked and every input checked."""
    for plan in plans:
        for note in plan.notes:
            emit(SweepEvent("note", f"{plan.spec.label}: {note}"))
    done = processes.from_main(lambda: _index(read_results(out / RESULTS)))
    run = _Run(settings, out, emit, done, sum(len(p.variants) for p in plans), processes)
    if references is not None:
        run.start_mauve(references, max(plan.draft.length for plan in plans))
    if references is not None or any(
        run.done.get(_key(p.spec.label, v.id, p.config)) is None for p in plans for v in p.variants
    ):
        # Something will be scored: a judge that cannot load must fail now, not after minutes of drafting.
        emit(SweepEvent("step", f"loading the judge {settings.judge}", run.step, run.steps))
        run.judge()
    rows = [row for plan in plans for row in run.model(plan)]
    rows += _earlier_compatible(run.done, plans, rows)
    emit(SweepEvent("step", "writing the report", run.step, run.steps))

    def write() -> Any:
        return write_report(
            out, rows, base_gamma=settings.base_gamma, base_refine_block_size=settings.base_refine_block_size
        )

    report = processes.from_main(write)
    if report.note:
        emit(SweepEvent("note", report.note))
    emit(SweepEvent("step", "done", run.step, run.steps))
    return SweepResult(rows, report.path, report.plots, **run.counts, verdicts=report.verdicts)


def _plan_model(spec: ModelSpec, settings: SweepSettings) -> _ModelPlan:
    """Resolve a model's length and variants from its config alone (no weights loaded)."""
    folder = resolve(spec.path)
    model_length = read_config(folder).model_length
    length = settings.length or model_length
    if length > model_length:
        raise UsageError(f"--length {length} exceeds the length {model_length} model {spec.label} was trained on")
    draft = DraftSettings(length, settings.draft_block_size, kv_cache=settings.kv_cache, unmasking=settings.unmasking)
    sizes, notes = refine_block_sizes(settings.refine_block_sizes, length)
    base_size = refine_block_sizes([settings.base_refine_block_size or length], length)[0][0]
    variants = plan_variants(
        settings.remask,
        settings.gammas,
        sizes,
        base_gamma=settings.base_gamma,
        base_block_size=base_size,
        grid=settings.grid,
        confidence_thresholds=settings.confidence_thresholds,
        refine_caches=settings.refine_caches,
        length=length,
    )
    frontier = frontier_variants(settings.draft_top_ps, settings.draft_temperatures, settings.unmasking)
    variants = [variants[0], *frontier, *variants[1:]]  # the draft frontier right after the sweep's draft
    weights = folder / _WEIGHTS
    config = {
        "sha256": file_sha256(weights) if weights.is_file() else None,
        "length": length,
        "draft_block_size": settings.draft_block_size,
        "num_samples": settings.num_samples,
        "seed": settings.seed,
        "dtype": _dtype_name(settings.dtype),
        "unmasking": _unmasking_config(settings.unmasking),
        "kv_cache": settings.kv_cache,
        "judge": settings.judge,
        "context": settings.evaluation.context,
        "stride": settings.evaluation.stride,
        "degenerate_entropy": settings.evaluation.degenerate_entropy,
    }
    # Through JSON, so it compares equal to the copy read back from results.jsonl.
    return _ModelPlan(spec, draft, variants, json.loads(json.dumps(config)), notes)


class _Run:
    """The state of one run: which rows exist, the judge (loaded once, on first use), counters for the result."""

    def __init__(
        self,
        settings: SweepSettings,
        out: Path,
        emit: EventFn,
        done: dict[tuple[str, str, str], dict[str, Any]],
        steps: int,
        processes: Processes,
    ) -> None:
        self.settings, self.out, self.emit, self.done = settings, out, emit, done
        self.processes = processes
        self.step, self.steps = 0, steps
        self.counts = {"drafted": 0, "refined": 0, "scored": 0, "reused": 0}
        self.judge = functools.cache(lambda: load_judge(settings.judge, device=settings.device))
        self.mauve: Callable[[list[str]], dict[str, Any]] | None = None
        self.mauve_reference: dict[str, Any] | None = None

    def start_mauve(self, references: tuple[str, str, list[str]], length: int) -> None:
        """Score MAUVE of every file against the references, cut at `length` judge tokens; or note why not."""
        name, digest, texts = references
        self.mauve_reference = {"reference": name, "reference_sha256": digest}
        if not mauve_available():
            self.emit(SweepEvent("note", f"MAUVE skipped: mauve-text is not installed ({INSTALL_HINT})"))
            return
        settings = MauveSettings(max_tokens=length, batch_size=self.settings.evaluation.batch_size)
        if self.settings.num_samples < _MAUVE_FEW:
            self.emit(
                SweepEvent(
                    "note",
                    f"MAUVE from {self.settings.num_samples} samples per file is coarse (k-means on so few texts has "
                    f"{default_buckets(self.settings.num_samples, len(texts))} buckets; mauve-text's authors use "
                    "thousands)",
                )
            )

        reference = self.mauve_reference
        # Built on first use: the judge loads lazily, and the references are featurised once.
        scorer = functools.cache(lambda: mauve_scorer(texts, self.judge(), settings))

        def score(samples: list[str]) -> dict[str, Any]:
            return {**reference, **scorer()(samples).to_dict()}

        self.mauve = score

    def with_mauve(self, row: dict[str, Any], records: list[Record] | None, append: bool = True) -> dict[str, Any]:
        """The row with MAUVE against the sweep's reference, computed when it lacks it.

        A row that was already in `results.jsonl` is appended again with MAUVE (`append`), superseding the old line:
        readers take the last row per (model, variant, configuration), as `report.latest_rows` does.
        """
        if self.mauve is None or self.mauve_reference is None:
            return row
        present = row.get("mauve") or {}
        if all(present.get(key) == value for key, value in self.mauve_reference.items()):
            return row
        if records is None:
            records = self.processes.from_main(lambda: _read_complete(self.out / str(row.get("file"))))
        if records is None:
            self.emit(SweepEvent("note", f"{row['model']} {row['variant']}: sample file gone; no MAUVE"))
            return row
        self.emit(SweepEvent("progress", "MAUVE", self.step, self.steps))
        texts = [record.text for record in records]
        updated = {**row, "mauve": self.processes.from_main(lambda: self.mauve(texts))}  # type: ignore[misc]
        if append:
            self.processes.from_main(lambda: append_result(self.out / RESULTS, updated))
        return updated

    def model(self, plan: _ModelPlan) -> list[dict[str, Any]]:
        """Rows for every variant of one model, computing only what `results.jsonl` lacks."""
        settings, label = self.settings, plan.spec.label
        # Loaded on first need and dropped with this frame, so only one model is in memory at a time.
        load = functools.cache(lambda: _load(plan.spec.path, settings))
        drafts: list[Record] | None = None
        rows = []
        for variant in plan.variants:
            name = f"{label}: {'refine ' + variant.id if variant.remask else variant.id}"
            self.emit(SweepEvent("step", name, self.step, self.steps))
            row = self.done.get(_key(label, variant.id, plan.config))
            records = None
            if row is not None:
                self.counts["reused"] += 1
            else:
                if variant.frontier:
                    records = self._drafts(plan, load, variant)
                else:
                    drafts = drafts if drafts is not None else self._drafts(plan, load)
                    records = drafts if variant is DRAFT else self._refined(plan, variant, drafts, load)
                row = self._score(plan, variant, records)
            rows.append(self.with_mauve(row, records))  # a reused row without it gets MAUVE and is appended again
            self.step += 1
        return rows

    def _drafts(self, plan: _ModelPlan, load: Callable[[], tuple[Any, Any]], variant: Variant = DRAFT) -> list[Record]:
        """The sweep's drafts, or (for a draft-frontier variant) drafts at that variant's top-p and temperature."""
        path = self.out / plan.folder / f"{variant.id}.jsonl"
        draft = dataclasses.replace(plan.draft, unmasking=variant.unmasking(plan.draft.unmasking))

        def reusable() -> list[Record] | None:
            records = _read_complete(path)
            return records if records is not None and _drafts_match(records, plan, draft.unmasking) else None

        records = self.processes.from_main(reusable)
        if records is not None:
            return records
        model, tokenizer = load()
        self.counts["drafted"] += 1
        stream = api.draft(
            model,
            tokenizer,
            draft,
            num_samples=self.settings.num_samples,
            seed=self.settings.seed,
            batch_size=self.settings.batch_size,
            shard=self.processes.shard,
            on_progress=self._on_samples,
        )
        return self._write(path, stream)

    def _write(self, path: Path, stream: Iterable[Record]) -> list[Record]:
        """One process streams its records to `path`; several gather theirs and the main process writes them."""
        if self.processes.shard.world == 1:
            return _write_records(path, stream)
        records = self.processes.all_of(list(stream))

        def write() -> None:
            _write_records(path, records)

        self.processes.from_main(write)
        return records

    def _refined(
        self, plan: _ModelPlan, variant: Variant, drafts: list[Record], load: Callable[[], tuple[Any, Any]]
    ) -> list[Record]:
        path = self.out / plan.folder / f"{variant.id}.jsonl"

        def reusable() -> list[Record] | None:
            records = _read_complete(path)
            return records if records is not None and _refined_match(records, drafts, variant, plan) else None

        records = self.processes.from_main(reusable)
        if records is not None:
            return records
        model, tokenizer = load()
        self.counts["refined"] += 1
        refine_settings = RefineSettings(
            gamma=variant.gamma,
            # None is one global block: what `did generate` passes for B2 = L.
            block_size=None if variant.refine_block_size >= plan.draft.length else variant.refine_block_size,
            remask=variant.remask,
            kv_cache=self.settings.kv_cache,
            unmasking=variant.unmasking(self.settings.unmasking),
            refine_cache=variant.refine_cache,
        )
        stream = api.refine(
            model,
            tokenizer,
            drafts,
            refine_settings,
            seed=self.settings.seed,
            batch_size=self.settings.batch_size,
            shard=self.processes.shard,
            on_progress=self._on_samples,
        )
        return self._write(path, stream)

    def _score(self, plan: _ModelPlan, variant: Variant, records: list[Record]) -> dict[str, Any]:
        judge: Judge = self.judge()
        file = f"{plan.folder}/{variant.id}.jsonl"

        def on_windows(done: int, total: int) -> None:
            self.emit(SweepEvent("progress", "scoring", self.step, self.steps, done, total, "windows"))

        shard = self.processes.shard
        samples = [Sample(r.text, r.prompt, id=r.id) for p, r in enumerate(records) if shard.owns(p)]
        result = score_samples(samples, judge, self.settings.evaluation, source=file, on_progress=on_windows)
        if shard.world > 1:
            result = summarize(file, self.processes.all_of(result.samples))
        row = result_row(plan.spec, variant, plan.config, result, records, judge.info)
        row = self.with_mauve(row, records, append=False)  # one row per scored file, MAUVE included
        self.processes.from_main(lambda: append_result(self.out / RESULTS, row))
        self.counts["scored"] += 1
        return row

    def _on_samples(self, progress: api.Progress) -> None:
        event = SweepEvent(
            "progress",
            progress.stage,
            self.step,
            self.steps,
            progress.samples_done,
            self.settings.num_samples,
            "samples",
        )
        self.emit(event)


def result_row(
    spec: ModelSpec,
    variant: Variant,
    config: dict[str, Any],
    result: FileResult,
    records: Sequence[Record],
    judge: dict[str, Any],
) -> dict[str, Any]:
    """One line of `results.jsonl`: the variant, its scores, its cost per sample, and what produced it.

    `nfes` and `seconds` are means per sample over all stages (draft + refinement), as the paper counts the cost
    of a refined sample; `draft_nfes` and `refine_nfes` split the NFEs, `draft_seconds` and `refine_seconds` the
    wall-clock. `top_p` and `temperature` are the draft's; `draft_frontier` marks drafts drawn only for the draft
    frontier; `per_sample` holds the ids, perplexities and entropies behind `gen_ppl` and `entropy`. `config` is the
    sweep's and keys the row (its `unmasking` is the refined drafts', so a frontier draft's own nucleus and temperature
    are in `top_p` and `temperature` only); `mauve`, when a reference was given, is MAUVE against it.
    """
    ppls = [s.ppl for s in result.samples if s.scored_tokens]
    finite = all(math.isfinite(p) for p in ppls)
    sem = statistics.stdev(ppls) / math.sqrt(len(ppls)) if len(ppls) > 1 and finite else None
    summary = result.summary()
    unmasking = config["unmasking"]
    return {
        "model": spec.label,
        "model_path": spec.path,
        "variant": variant.id,
        "draft_frontier": variant.frontier,
        "top_p": variant.top_p if variant.top_p is not None else unmasking["top_p"],
        "temperature": variant.temperature if variant.temperature is not None else unmasking["temperature"],
        "remask": variant.remask,
        "gamma": variant.gamma,
        "refine_block_size": variant.refine_block_size,
        "confidence_threshold": variant.confidence_threshold,
        "refine_cache": variant.refine_cache,
        "length": config["length"],
        "draft_block_size": config["draft_block_size"],
        **{key: summary[key] for key in ("gen_ppl", "gen_ppl_pooled", "entropy", "num_degenerate", "num_samples")},
        "gen_ppl_sem": sem,
        "mean_tokens": summary["mean_tokens"],
        "nfes": _mean(sum(s.get("nfes", 0) for s in r.stages) for r in records),
        "draft_nfes": _mean(r.stages[0].get("nfes", 0) for r in records),
        "refine_nfes": _mean(sum(s.get("nfes", 0) for s in r.stages[1:]) for r in records),
        "seconds": _mean(sum(s.get("seconds", 0.0) for s in r.stages) for r in records),
        "draft_seconds": _mean(r.stages[0].get("seconds", 0.0) for r in records),
        "refine_seconds": _mean(sum(s.get("seconds", 0.0) for s in r.stages[1:]) for r in records),
        "file": result.source,
        # What gen PPL and entropy average, per sample (null: no token to score), for standard errors of
        # differences between variants (did_cli.entropy_matched pairs samples by id).
        "per_sample": {
            "id": [s.id for s in result.samples],
            "ppl": [s.ppl if s.scored_tokens and math.isfinite(s.ppl) else None for s in result.samples],
            "entropy": [s.entropy for s in result.samples],
        },
        "judge": judge,
        "config": config,
        "versions": versions(),
    }


# --- Files and checks -------------------------------------------------------------------------------------------------


def _read_references(reference: str | Path | None) -> tuple[str, str, list[str]] | None:
    """(name, sha256, texts) of the MAUVE reference, read whole and checked before anything runs."""
    if reference is None:
        return None
    path = Path(reference)
    if str(reference) == "-":
        raise InputError(
            "--reference -: the sweep reads its reference once per run and records its sha256; give a file"
        )
    if not path.exists():
        raise InputError(f"--reference {reference} does not exist")
    if not path.is_file():
        raise InputError(f"--reference {reference} is not a file")
    texts = [sample.text for sample in read_reference(path)]
    if len(texts) < 2:
        raise InputError(f"--reference {reference}: MAUVE needs at least 2 reference texts, found {len(texts)}")
    return str(reference), file_sha256(path), texts


def _load(path: str, settings: SweepSettings) -> tuple[Any, Any]:
    model = load_model(path, device=settings.device, dtype=settings.dtype)
    return model, load_tokenizer(model)


def _write_records(path: Path, records: Iterable[Record]) -> list[Record]:
    """Write records line by line (an interrupted run keeps what is finished) and return them."""
    kept = []
    with RecordWriter(path, replace_partial=True) as writer:  # an interrupted variant is redone whole
        for record in records:
            writer.write(record)
            kept.append(record)
    return kept


def _read_complete(path: Path) -> list[Record] | None:
    """The records of a sample file, or None when it is missing or unreadable (e.g. a line cut by an interrupt)."""
    if not path.is_file():
        return None
    try:
        return list(read_records(path))
    except InputError:
        return None


def _has(stage: dict[str, Any], expected: dict[str, Any]) -> bool:
    return all(stage.get(key) == value for key, value in expected.items())


def _drafts_match(records: list[Record], plan: _ModelPlan, unmasking: UnmaskingSettings) -> bool:
    """Whether a draft file holds exactly the drafts this plan asks for at this unmasking, from these weights."""
    config = plan.config
    stage = {
        "kind": "draft",
        "block_size": config["draft_block_size"],
        "seed": config["seed"],
        "kv_cache": config["kv_cache"],
        **json.loads(json.dumps(_unmasking_config(unmasking))),
    }
    return len(records) == config["num_samples"] and all(
        r.id == i
        and r.seed == config["seed"]
        and len(r.tokens) == config["length"]
        and len(r.stages) == 1
        and _has(r.stages[0], stage)
        and r.model.get("sha256") == config["sha256"]
        and r.dtype == config["dtype"]
        for i, r in enumerate(records)
    )


def _refined_match(records: list[Record], drafts: list[Record], variant: Variant, plan: _ModelPlan) -> bool:
    """Whether a refined file is this variant's refinement of exactly these drafts."""
    stage = {
        "kind": "refine",
        "block_size": variant.refine_block_size,
        "gamma": variant.gamma,
        "remask": variant.remask,
        "seed": plan.config["seed"],
        **plan.config["unmasking"],
        **_unmasking_config(variant.unmasking(UnmaskingSettings(**plan.config["unmasking"]))),
    }
    # Files written before `refine_cache` existed were exact refinements.
    return len(records) == len(drafts) and all(
        r.id == d.id
        and r.draft_tokens == d.tokens
        and len(r.stages) == 2
        and _has(r.stages[1], stage)
        and r.stages[1].get("refine_cache", 1) == variant.refine_cache
        for r, d in zip(records, drafts, strict=True)
    )


def _unmasking_config(unmasking: UnmaskingSettings) -> dict[str, Any]:
    """The unmasking settings as configuration; an unset threshold is left out, as in rows written before it."""
    config = dataclasses.asdict(unmasking)
    if config["confidence_threshold"] is None:
        del config["confidence_threshold"]
    return config


def _key(label: str, variant: str, config: dict[str, Any]) -> tuple[str, str, str]:
    return label, variant, json.dumps(config, sort_keys=True)


def _earlier_compatible(
    done: dict[tuple[str, str, str], dict[str, Any]], plans: list[_ModelPlan], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Rows of earlier runs in the same folder made with the same models and settings but other variants.

    They belong in the report: a strategy ablation and a gamma sweep run as two commands on one folder share their
    drafts and judge, so the report should show both.
    """
    configs = {(plan.spec.label, json.dumps(plan.config, sort_keys=True)) for plan in plans}
    present = {(row.get("model"), row.get("variant")) for row in rows}
    return [
        row
        for (label, variant, config), row in done.items()
        if (label, config) in configs and (label, variant) not in present
    ]


# Below this many samples per file MAUVE's histograms have at most 2 buckets and its values are coarse.
_MAUVE_FEW = 25

# Configuration keys added after rows were first written, with the value every earlier row was made with.
_CONFIG_DEFAULTS = {"kv_cache": True}


def _index(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Rows by (model label, variant id, configuration): rows of other settings stay in the file and are skipped."""
    index = {}
    for row in rows:
        config = row.get("config")
        if isinstance(config, dict):
            config = {**_CONFIG_DEFAULTS, **config}
        index[_key(row.get("model"), row.get("variant"), config)] = row
    return index


def _dtype_name(dtype: str) -> str:
    return str(parse_dtype(dtype)).removeprefix("torch.")


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else math.nan
