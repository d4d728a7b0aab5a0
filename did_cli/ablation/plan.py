"""The sweep's plan, pure: the models, the variants of each, and the settings every sample file is made with.

Nothing here loads a model or writes a file, so the plan is tested without models (`tests/ablation/test_plan.py`).

* Every variant refines the *same* drafts (one draft per model, fixed seed and B1), and refinement randomness
  depends only on (seed, sample id, stage), so variants differ by their settings alone. Such common random numbers
  make differences between variants visible with few samples.
* One axis at a time around the base point (snapshot, γ = 0.5, B2 = L): every strategy at the base γ and B2 (the
  strategy ablation), then the base strategy alone over the γ values at the base B2 and over the B2 values at the
  base γ. `grid=True` runs every (strategy, γ, B2) combination instead.
* Cheaper refinements (`confidence_thresholds`, `refine_caches`) run at the base strategy and γ with a global block,
  every combination, beside the exact refinement they approximate.
* The draft frontier (`draft_top_ps`, `draft_temperatures`): extra drafts at sharper or flatter sampling, scored but
  never refined, so every refined variant is read at matched entropy (`did_cli.ablation.entropy_matched`).
* Sample files are keyed by their settings: each model's files live in a folder named by a short hash of everything
  that determines the drafts (`samples_key`), so a run with other settings writes new files and a results row never
  cites a file that a later run changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from did_cli.errors import UsageError
from did_cli.evaluation.settings import DEFAULT_JUDGE, EvalSettings
from did_cli.settings import (
    EDIT,
    DraftSettings,
    EditSettings,
    RefineSettings,
    UnmaskingSettings,
    canonical_remask,
    check_device_name,
    dtype_name,
)

__all__ = [
    "DRAFT",
    "ModelPlan",
    "ModelSpec",
    "SweepSettings",
    "Variant",
    "frontier_variants",
    "parse_model",
    "plan_model",
    "plan_variants",
    "refine_block_sizes",
    "samples_key",
]

DEFAULT_REFINE_BLOCK_SIZES = (16, 64)  # and L: the paper's global block
BASE_REMASK = "snapshot"  # the strategy of the base point, swept over γ and B2 (the paper's)
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Training runs end in generic folder names; the run's own folder says which model it is.
_GENERIC = re.compile(r"final|last|latest|(checkpoint|step)[-_]?\d*")


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
        remask: a remask strategy (`config.REMASK_STRATEGIES`), `edit` for an editing stage, or None for the draft.
        gamma: fraction γ of generated tokens remasked.
        refine_block_size: B2 resolved against the length: L means one global block.
        confidence_threshold: commit every position above it per call (confidence order); None: the sweep's order.
        refine_cache: R, kept positions' keys/values recomputed every R calls (1: exact).
        top_p: for a draft of the draft frontier, its nucleus mass (None: the sweep's).
        temperature: for a draft of the draft frontier, its temperature (None: the sweep's).
        edit_threshold: for `edit`, the probability a replacing token must exceed.
    """

    remask: str | None = None
    gamma: float | None = None
    refine_block_size: int | None = None
    confidence_threshold: float | None = None
    refine_cache: int = 1
    top_p: float | None = None
    temperature: float | None = None
    edit_threshold: float | None = None

    @property
    def id(self) -> str:
        """File and row name: `draft`, `draft-p0.8-temp0.7` (draft frontier), `edit-t0.9`, or `snapshot-g0.5-b1024`.

        Cheaper refinements add `-t0.9` (threshold) and `-r4` (R).
        """
        if self.remask == EDIT:
            return f"edit-t{self.edit_threshold:.10g}"
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
    edit_thresholds: Sequence[float] = (),
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
        edit_thresholds: with `edit` among `remask`, an editing variant at each threshold (beside the base point).

    Returns:
        Distinct variants, the draft first, cheaper refinements (at the base strategy and γ, B2 = L) last.
    """
    edits = [Variant(EDIT, edit_threshold=float(t)) for t in edit_thresholds] if EDIT in remask else []
    remask = [strategy for strategy in remask if strategy != EDIT] or ["snapshot"]
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
    return [DRAFT, *dict.fromkeys([*base_point, *edits, *slices, *cheaper])]


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
        remask: strategies to compare (each is also swept over γ and B2); `edit` adds editing stages (no remasking)
            at each of `edit_thresholds`.
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
            `draft_temperatures`, so refined variants can be read at matched entropy (`ablation.entropy_matched`). The
            sweep's own draft, at `unmasking.top_p`, is always a point of it. Empty: no frontier along top-p.
        draft_temperatures: temperatures of the draft frontier, likewise.
        edit_thresholds: thresholds of the `edit` variants (`did refine --edit-threshold`).
        passes: M of the strategies that score with several model calls (mc-dropout, mc-variance, noise-ensemble).
        ensemble_ratio: the share of generated positions each noise-ensemble pass masks.
        reference: reference texts (JSONL with a text field, sample records, or .txt one per line) for MAUVE of every
            scored file against them, with the judge's features (`did_cli.evaluation.mauve`); None: no MAUVE. Added
            to existing rows without sampling or scoring again; skipped with a note when mauve-text is not installed.
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
    edit_thresholds: Sequence[float] = (0.9,)
    passes: int = 8
    ensemble_ratio: float = 0.5

    def __post_init__(self) -> None:
        # Lists from Python callers become tuples, so the settings stay hashable and cannot change under a run.
        names = ("models", "remask", "gammas", "refine_block_sizes", "confidence_thresholds", "refine_caches")
        names += ("edit_thresholds",)
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
        strategies = (EDIT if s.strip().lower() == EDIT else canonical_remask(s) for s in self.remask)
        object.__setattr__(self, "remask", tuple(dict.fromkeys(strategies)))
        if EDIT in self.remask:
            if not self.edit_thresholds:
                raise UsageError("--remask edit needs at least one --edit-threshold")
            for threshold in self.edit_thresholds:
                EditSettings(threshold=threshold)
        RefineSettings(passes=self.passes, ensemble_ratio=self.ensemble_ratio)
        for gamma in (*self.gammas, self.base_gamma):
            if not 0.0 <= gamma <= 1.0:
                raise UsageError(f"--gamma must be in [0, 1], got {gamma}")
        if self.length is not None:
            DraftSettings(self.length, self.draft_block_size)
        elif self.draft_block_size < 1:
            raise UsageError(f"--draft-block-size must be positive, got {self.draft_block_size}")
        dtype_name(self.dtype)
        check_device_name(self.device)
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


@dataclass(frozen=True)
class ModelPlan:
    """One model's part of a sweep: its draft settings, its variants and the configuration that keys its results.

    Attributes:
        spec: the model and its label.
        draft: the settings of the drafts every refined variant refines.
        variants: the draft, the frontier's drafts, then the refinements, in run order.
        config: everything besides the variant that determines a row's numbers (as JSON values, so it compares equal
            to the copy read back from results.jsonl).
        notes: one line per default B2 left out.
    """

    spec: ModelSpec
    draft: DraftSettings
    variants: list[Variant]
    config: dict[str, Any]
    notes: list[str]

    @property
    def folder(self) -> str:
        """`<label>/<hash>`: where this plan's sample files live, named by what determines the drafts."""
        return f"{self.spec.label}/{samples_key(self.config)}"

    def file(self, variant: Variant) -> str:
        """A variant's sample file, relative to the sweep folder."""
        return f"{self.folder}/{variant.id}.jsonl"

    def draft_settings(self, variant: Variant = DRAFT) -> DraftSettings:
        """The drafts of `variant`: the sweep's, or a frontier draft's at its own top-p and temperature."""
        return dataclasses.replace(self.draft, unmasking=variant.unmasking(self.draft.unmasking))

    def refine_settings(self, variant: Variant) -> RefineSettings | EditSettings:
        """The refinement (or editing stage) a refined variant runs on the sweep's drafts."""
        if variant.remask == EDIT:
            assert variant.edit_threshold is not None
            return EditSettings(threshold=variant.edit_threshold, unmasking=self.draft.unmasking)
        assert variant.remask is not None and variant.gamma is not None and variant.refine_block_size is not None
        return RefineSettings(
            gamma=variant.gamma,
            # None is one global block: what `did generate` passes for B2 = L.
            block_size=None if variant.refine_block_size >= self.draft.length else variant.refine_block_size,
            remask=variant.remask,
            kv_cache=self.draft.kv_cache,
            unmasking=variant.unmasking(self.draft.unmasking),
            refine_cache=variant.refine_cache,
            passes=self.config.get("passes", 8),
            ensemble_ratio=self.config.get("ensemble_ratio", 0.5),
        )


# What determines a model's drafts (and, with each variant's own settings, its refinements).
_SAMPLE_KEYS = ("sha256", "length", "draft_block_size", "num_samples", "seed", "dtype", "unmasking", "kv_cache")


def samples_key(config: dict[str, Any]) -> str:
    """A short hash of the settings that determine a model's sample files (its drafts and their refinements)."""
    body = json.dumps({key: config.get(key) for key in _SAMPLE_KEYS}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:10]


def plan_model(spec: ModelSpec, settings: SweepSettings, model_length: int, sha256: str | None) -> ModelPlan:
    """A model's plan from its length and weights hash alone (no weights loaded).

    Raises:
        UsageError: a length beyond the model's, or a B2 that does not divide L.
    """
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
        edit_thresholds=settings.edit_thresholds,
    )
    frontier = frontier_variants(settings.draft_top_ps, settings.draft_temperatures, settings.unmasking)
    variants = [variants[0], *frontier, *variants[1:]]  # the draft frontier right after the sweep's draft
    config = {
        "sha256": sha256,
        "length": length,
        "draft_block_size": settings.draft_block_size,
        "num_samples": settings.num_samples,
        "seed": settings.seed,
        "dtype": dtype_name(settings.dtype),
        "unmasking": unmasking_config(settings.unmasking),
        "kv_cache": settings.kv_cache,
        "judge": settings.judge,
        "context": settings.evaluation.context,
        "stride": settings.evaluation.stride,
        "degenerate_entropy": settings.evaluation.degenerate_entropy,
        "passes": settings.passes,
        "ensemble_ratio": settings.ensemble_ratio,
    }
    return ModelPlan(spec, draft, variants, json.loads(json.dumps(config)), notes)


def unmasking_config(unmasking: UnmaskingSettings) -> dict[str, Any]:
    """The unmasking settings as configuration; an unset threshold is left out, as in rows written before it."""
    config = dataclasses.asdict(unmasking)
    if config["confidence_threshold"] is None:
        del config["confidence_threshold"]
    return config
