"""The paper's ablations as one sweep: a pure plan, a runner that calls down, a results store, and the report.

One job per module: `plan` (models, variants and settings; pure), `run` (`run_sweep`: sampling, reuse and scoring
through the API), `results` (the `results.jsonl` store and its row schema), `rows` (reading rows as table cells),
`tables` (report.md's Markdown), `matched` (the entropy-matched view), `entropy_matched` (its pure math), `plots`
(the pictures) and `report` (writing report.md and the plots).
"""

from __future__ import annotations

from did_cli.lazy import lazy_exports

# Loaded on first use (PEP 562): importing one light module of this package (the CLI's option lists) must not
# import torch.
_EXPORTS = {
    "DRAFT": "did_cli.ablation.plan",
    "ModelPlan": "did_cli.ablation.plan",
    "ModelSpec": "did_cli.ablation.plan",
    "SweepSettings": "did_cli.ablation.plan",
    "Variant": "did_cli.ablation.plan",
    "frontier_variants": "did_cli.ablation.plan",
    "parse_model": "did_cli.ablation.plan",
    "plan_model": "did_cli.ablation.plan",
    "plan_variants": "did_cli.ablation.plan",
    "refine_block_sizes": "did_cli.ablation.plan",
    "samples_key": "did_cli.ablation.plan",
    "ReportResult": "did_cli.ablation.report",
    "write_report": "did_cli.ablation.report",
    "RESULTS": "did_cli.ablation.results",
    "latest_rows": "did_cli.ablation.results",
    "read_results": "did_cli.ablation.results",
    "result_row": "did_cli.ablation.results",
    "SweepEvent": "did_cli.ablation.run",
    "SweepResult": "did_cli.ablation.run",
    "run_sweep": "did_cli.ablation.run",
}

__all__ = [
    "DRAFT",
    "RESULTS",
    "ModelPlan",
    "ModelSpec",
    "ReportResult",
    "SweepEvent",
    "SweepResult",
    "SweepSettings",
    "Variant",
    "frontier_variants",
    "latest_rows",
    "parse_model",
    "plan_model",
    "plan_variants",
    "read_results",
    "refine_block_sizes",
    "result_row",
    "run_sweep",
    "samples_key",
    "write_report",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
