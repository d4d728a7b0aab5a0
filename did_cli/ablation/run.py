"""Running a sweep: draft once per model, refine the same drafts per variant, score every file, write the report.

`run_sweep` orchestrates; it re-implements nothing it calls. Samples come from `api.draft` and `api.refine`, sample
files are written and resumed by `record_files.RecordOutput` (part files and merging included), a file is reused
exactly when `provenance.made_with` says it was made with the plan's inputs and settings (the rule `--resume` uses),
samples are scored by `evaluation.score_file` and MAUVE by `evaluation.ReferenceMauve` (the paths `did eval-ppl`
uses), rows are stored by `ablation.results` and the report written by `ablation.report`.

* The judge is loaded (or its absence reported) before any drafting, unless every variant is already scored.
* Resumable at two levels. A variant with a row in `results.jsonl` for the same configuration is not touched. A
  sample file made with the plan's settings is scored without sampling again; an interrupted one is continued.
* Models and the judge load only when something needs them, so re-running a finished sweep loads nothing and only
  rewrites the report.

Layout of the output folder: `<label>/<settings hash>/draft.jsonl` and `<label>/<settings hash>/<variant>.jsonl`
(sample records), `results.jsonl` (one row per scored file, appended), `report.md` and its plots.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from did_cli import api
from did_cli.ablation.plan import DRAFT, ModelPlan, SweepSettings, Variant, plan_model
from did_cli.ablation.report import write_report
from did_cli.ablation.results import (
    CONTINUE,
    RESULTS,
    append_result,
    earlier_compatible,
    index_rows,
    read_results,
    result_row,
    row_key,
)
from did_cli.checkpoints import checkpoint_tokenizer, file_sha256, load_model, read_config, resolve
from did_cli.errors import InputError
from did_cli.evaluation import Judge, ReferenceMauve, Sample, load_judge, read_reference, sample_from_record, score_file
from did_cli.evaluation.mauve import few_texts_note, mauve_unavailable
from did_cli.locks import locked_folder
from did_cli.processes import ONE_PROCESS, Processes
from did_cli.provenance import Expected, Identity, expect_drafts, expect_refinements, made_with, tokenizer_info
from did_cli.record_files import RecordOutput, read_complete_records
from did_cli.records import Record

__all__ = ["SweepEvent", "SweepResult", "run_sweep"]

# The weights file of a did or BD3-LM checkpoint folder (see did_cli.checkpoints).
_WEIGHTS = "model.safetensors"


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


def run_sweep(
    settings: SweepSettings, on_event: EventFn | None = None, processes: Processes = ONE_PROCESS
) -> SweepResult:
    """Draft, refine and score every variant of every model, append the rows to `results.jsonl`, write the report.

    Every model and size is checked before anything runs, so bad input fails before minutes of sampling.

    Args:
        settings: models, variants, samples and output folder.
        on_event: called with each SweepEvent (notes, steps, per-sample and per-window progress), on the main
            process only.
        processes: with several processes (`accelerate launch`), each draws, refines and scores its share of the
            samples; files and rows equal a one-process run's.

    Returns:
        The rows of this sweep, the report and plot paths, and how much was computed versus reused.

    Raises:
        UsageError: sizes that do not fit a model (a length beyond the model's, a B2 that does not divide L).
        ModelLoadError: a model or the judge cannot be found.
    """
    emit = on_event if on_event is not None and processes.is_main else (lambda event: None)
    out = Path(settings.out)
    references = _read_references(settings.reference)  # a broken reference fails before any model is looked up
    plans = [_plan(spec, settings) for spec in settings.model_specs]
    # One sweep per folder at a time: a second would redo the first one's work and collide on its files.
    with locked_folder(out, take=processes.is_main, what="did sweep"):
        return _run_locked(settings, out, plans, references, emit, processes)


def _plan(spec: Any, settings: SweepSettings) -> ModelPlan:
    """A model's plan from its config and weights file (no weights loaded)."""
    folder = resolve(spec.path)
    weights = folder / _WEIGHTS
    return plan_model(
        spec, settings, read_config(folder).model_length, file_sha256(weights) if weights.is_file() else None
    )


def _run_locked(
    settings: SweepSettings,
    out: Path,
    plans: list[ModelPlan],
    references: tuple[str, str, list[Sample]] | None,
    emit: EventFn,
    processes: Processes,
) -> SweepResult:
    """`run_sweep`'s work, with the output folder locked and every input checked."""
    for plan in plans:
        for note in plan.notes:
            emit(SweepEvent("note", f"{plan.spec.label}: {note}"))
    done = processes.from_main(lambda: index_rows(read_results(out / RESULTS)))
    runner = SweepRunner(settings, out, emit, done, sum(len(p.variants) for p in plans), processes)
    if references is not None:
        runner.start_mauve(references)
    if references is not None or any(
        runner.done.get(row_key(p.spec.label, v.id, p.config)) is None for p in plans for v in p.variants
    ):
        # Something will be scored: a judge that cannot load must fail now, not after minutes of drafting.
        emit(SweepEvent("step", f"loading the judge {settings.judge}", runner.step, runner.steps))
        runner.judge()
    rows = [row for plan in plans for row in runner.model(plan)]
    rows += earlier_compatible(runner.done, plans, rows)
    emit(SweepEvent("step", "writing the report", runner.step, runner.steps))

    def write() -> Any:
        return write_report(
            out, rows, base_gamma=settings.base_gamma, base_refine_block_size=settings.base_refine_block_size
        )

    report = processes.from_main(write)
    if report.note:
        emit(SweepEvent("note", report.note))
    emit(SweepEvent("step", "done", runner.step, runner.steps))
    return SweepResult(rows, report.path, report.plots, **runner.counts, verdicts=report.verdicts)


class SweepRunner:
    """One sweep run's state: which rows exist, the judge (loaded once, on first use), counters for the result."""

    def __init__(
        self,
        settings: SweepSettings,
        out: Path,
        emit: EventFn,
        done: dict[Any, dict[str, Any]],
        steps: int,
        processes: Processes,
    ) -> None:
        self.settings, self.out, self.emit, self.done = settings, out, emit, done
        self.processes = processes
        self.step, self.steps = 0, steps
        self.counts = {"drafted": 0, "refined": 0, "scored": 0, "reused": 0}
        self.judge: Callable[[], Judge] = functools.cache(
            lambda: load_judge(settings.judge, device=processes.device_for(settings.device))
        )
        self.mauve: Callable[[list[Sample]], dict[str, Any]] | None = None
        self.mauve_reference: dict[str, Any] | None = None

    def start_mauve(self, references: tuple[str, str, list[Sample]]) -> None:
        """Score MAUVE of every file against the references (each file cut as its gen PPL is); or note why not."""
        name, digest, samples = references
        self.mauve_reference = {"reference": name, "reference_sha256": digest}
        skipped = mauve_unavailable()
        if skipped is not None:
            self.emit(SweepEvent("note", skipped))
            return
        few = few_texts_note(self.settings.num_samples, len(samples))
        if few is not None:
            self.emit(SweepEvent("note", few))
        reference = self.mauve_reference
        # Built on first use: the judge loads lazily, and the references are featurised once per cut.
        against = functools.cache(lambda: ReferenceMauve(samples, self.judge(), self.settings.evaluation))

        def score(file_samples: list[Sample]) -> dict[str, Any]:
            return {**reference, **against()(file_samples).to_dict()}

        self.mauve = score

    def with_mauve(self, row: dict[str, Any], records: list[Record] | None, append: bool = True) -> dict[str, Any]:
        """The row with MAUVE against the sweep's reference, computed when it lacks it.

        A row that was already in `results.jsonl` is appended again with MAUVE (`append`), superseding the old line:
        readers take the last row per (model, variant, configuration), as `results.latest_rows` does.
        """
        if self.mauve is None or self.mauve_reference is None:
            return row
        present = row.get("mauve") or {}
        if all(present.get(key) == value for key, value in self.mauve_reference.items()):
            return row
        if records is None:
            records = self.processes.from_main(lambda: _read_finished(self.out / str(row.get("file"))))
        if records is None:
            self.emit(SweepEvent("note", f"{row['model']} {row['variant']}: sample file gone; no MAUVE"))
            return row
        self.emit(SweepEvent("progress", "MAUVE", self.step, self.steps))
        samples = [sample_from_record(record) for record in records]
        updated = {**row, "mauve": self.processes.from_main(lambda: self.mauve(samples))}  # type: ignore[misc]
        if append:
            self.processes.from_main(lambda: append_result(self.out / RESULTS, updated))
        return updated

    def model(self, plan: ModelPlan) -> list[dict[str, Any]]:
        """Rows for every variant of one model, computing only what `results.jsonl` lacks."""
        # Loaded on first need and dropped with this frame, so only one model is in memory at a time.
        load = functools.cache(lambda: self._load(plan))
        identity = functools.cache(lambda: self._identity(plan))
        drafts: list[Record] | None = None
        rows = []
        for variant in plan.variants:
            name = f"{plan.spec.label}: {'refine ' + variant.id if variant.remask else variant.id}"
            self.emit(SweepEvent("step", name, self.step, self.steps))
            row = self.done.get(row_key(plan.spec.label, variant.id, plan.config))
            records = None
            if row is not None:
                self.counts["reused"] += 1
            else:
                if variant.remask is None:
                    records = self._drafts(plan, variant, load, identity)
                    drafts = records if variant is DRAFT else drafts
                else:
                    drafts = drafts if drafts is not None else self._drafts(plan, DRAFT, load, identity)
                    records = self._refined(plan, variant, drafts, load, identity)
                row = self._score(plan, variant, records)
            rows.append(self.with_mauve(row, records))  # a reused row without it gets MAUVE and is appended again
            self.step += 1
        return rows

    def _load(self, plan: ModelPlan) -> tuple[Any, Any]:
        model = load_model(
            plan.spec.path, device=self.processes.device_for(self.settings.device), dtype=self.settings.dtype
        )
        return model, api.load_tokenizer(model)

    def _identity(self, plan: ModelPlan) -> tuple[Identity, Any]:
        """What `made_with` compares, from the files alone: a reused sample file loads no weights."""
        tokenizer = checkpoint_tokenizer(plan.spec.path)
        dtype = plan.config["dtype"]
        return Identity(plan.config["sha256"], dtype, dtype, tokenizer_info(tokenizer)), tokenizer

    def _drafts(self, plan: ModelPlan, variant: Variant, load: Callable, identity: Callable) -> list[Record]:
        """The sweep's drafts, or (for a draft-frontier variant) drafts at that variant's top-p and temperature."""
        settings = plan.draft_settings(variant)
        who, tokenizer = identity()
        expected = expect_drafts(
            who, settings, self.settings.seed, api.encode_prompts(tokenizer, None), self.settings.num_samples
        )

        def make(skip: set[int]) -> Iterable[Record]:
            self.counts["drafted"] += 1
            model, tok = load()
            return api.draft(
                model,
                tok,
                settings,
                num_samples=self.settings.num_samples,
                seed=self.settings.seed,
                batch_size=self.settings.batch_size,
                skip_ids=skip,
                processes=self.processes,
                on_progress=self._on_samples,
            )

        return self._sample_file(plan, variant, expected, make)

    def _refined(
        self, plan: ModelPlan, variant: Variant, drafts: list[Record], load: Callable, identity: Callable
    ) -> list[Record]:
        """A refined variant of the sweep's drafts."""
        settings = plan.refine_settings(variant)
        expected = expect_refinements(identity()[0], settings, self.settings.seed, drafts)

        def make(skip: set[int]) -> Iterable[Record]:
            self.counts["refined"] += 1
            model, tok = load()
            return api.refine(
                model,
                tok,
                drafts,
                settings,
                seed=self.settings.seed,
                batch_size=self.settings.batch_size,
                skip_ids=skip,
                processes=self.processes,
                on_progress=self._on_samples,
            )

        return self._sample_file(plan, variant, expected, make)

    def _sample_file(
        self, plan: ModelPlan, variant: Variant, expected: Expected, make: Callable[[set[int]], Iterable[Record]]
    ) -> list[Record]:
        """A variant's sample file: reused when complete and made as the plan makes it, else continued or made.

        "Made as the plan makes it" is `provenance.made_with`, the rule `--resume` follows: a finished file is reused
        exactly when a resumed run would keep all of it, and an interrupted one is continued exactly as `--resume`
        continues it. Records made otherwise (by an older did, say) are made again, with a note.
        """
        path = self.out / plan.file(variant)

        def reusable() -> list[Record] | None:
            records = _read_finished(path)
            complete = records is not None and [r.id for r in records] == expected.ids
            return records if complete and made_with(records, expected) is None else None

        records = self.processes.from_main(reusable)
        if records is not None:
            return records
        with RecordOutput(path, self.processes, resume=True, how_to_continue=CONTINUE) as output:
            difference = self.processes.first([made_with(output.kept, expected)])
            if difference is not None:
                self.emit(SweepEvent("note", f"{path}: made again ({difference})"))
                output.restart()
            if output.kept_ids != set(self.processes.mine(expected.ids)):
                for record in make(output.kept_ids):
                    output.write(record)
        return self.processes.from_main(lambda: _read_finished(path))

    def _score(self, plan: ModelPlan, variant: Variant, records: list[Record]) -> dict[str, Any]:
        judge = self.judge()
        file = plan.file(variant)

        def on_windows(done: int, total: int) -> None:
            self.emit(SweepEvent("progress", "scoring", self.step, self.steps, done, total, "windows"))

        samples = [sample_from_record(record) for record in records]
        result = score_file(
            samples, judge, self.settings.evaluation, source=file, processes=self.processes, on_progress=on_windows
        )
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


def _read_references(reference: str | Path | None) -> tuple[str, str, list[Sample]] | None:
    """(name, sha256, samples) of the MAUVE reference, read whole and checked before anything runs."""
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
    samples = read_reference(path)
    if len(samples) < 2:
        raise InputError(f"--reference {reference}: MAUVE needs at least 2 reference texts, found {len(samples)}")
    return str(reference), file_sha256(path), samples


def _read_finished(path: Path) -> list[Record] | None:
    """The records of a finished sample file, or None when it is missing or damaged."""
    if not path.is_file():
        return None
    try:
        found = read_complete_records(path)
    except InputError:
        return None
    return found.records if found.dropped is None and found.size == path.stat().st_size else None
