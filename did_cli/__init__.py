"""did: Diffusion in Diffusion for BD3-LM block diffusion language models.

Draft with a small block size and a KV cache while recording each token's snapshot confidence, then remask the
least confident tokens and re-denoise them with a global block (arXiv 2601.13599).

The public names below load on first use (PEP 562), so `import did_cli` and the `did` command's `--help` do not
pay for importing torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from did_cli.lazy import lazy_exports

_EXPORTS = {
    "BD3LM": "did_cli.model",
    "DidError": "did_cli.errors",
    "DraftSettings": "did_cli.settings",
    "EditSettings": "did_cli.settings",
    "EvalSettings": "did_cli.evaluation.settings",
    "FinetuneSettings": "did_cli.settings",
    "Identity": "did_cli.provenance",
    "ModelConfig": "did_cli.config",
    "NllData": "did_cli.evaluation.settings",
    "NllSettings": "did_cli.evaluation.settings",
    "Processes": "did_cli.processes",
    "Record": "did_cli.records",
    "RecordOutput": "did_cli.record_files",
    "RefineSettings": "did_cli.settings",
    "SweepSettings": "did_cli.ablation.plan",
    "UnmaskingSettings": "did_cli.settings",
    "current_processes": "did_cli.processes",
    "draft": "did_cli.api",
    "encode_prompts": "did_cli.api",
    "eval_nll": "did_cli.evaluation.nll",
    "eval_ppl": "did_cli.api",
    "expect_drafts": "did_cli.provenance",
    "expect_refinements": "did_cli.provenance",
    "finetune": "did_cli.api",
    "generate": "did_cli.api",
    "load_model": "did_cli.checkpoints",
    "load_tokenizer": "did_cli.checkpoints",
    "made_with": "did_cli.provenance",
    "optimize": "did_cli.execution",
    "read_records": "did_cli.records",
    "refine": "did_cli.api",
    "run_sweep": "did_cli.ablation.run",
    "save_model": "did_cli.checkpoints",
}

__all__ = [
    "BD3LM",
    "DidError",
    "DraftSettings",
    "EditSettings",
    "EvalSettings",
    "FinetuneSettings",
    "Identity",
    "ModelConfig",
    "NllData",
    "NllSettings",
    "Processes",
    "Record",
    "RecordOutput",
    "RefineSettings",
    "SweepSettings",
    "UnmaskingSettings",
    "current_processes",
    "draft",
    "encode_prompts",
    "eval_nll",
    "eval_ppl",
    "expect_drafts",
    "expect_refinements",
    "finetune",
    "generate",
    "load_model",
    "load_tokenizer",
    "made_with",
    "optimize",
    "read_records",
    "refine",
    "run_sweep",
    "save_model",
]

if TYPE_CHECKING:
    from did_cli.ablation.plan import SweepSettings
    from did_cli.ablation.run import run_sweep
    from did_cli.api import draft, encode_prompts, eval_ppl, finetune, generate, refine
    from did_cli.checkpoints import load_model, load_tokenizer, save_model
    from did_cli.config import ModelConfig
    from did_cli.errors import DidError
    from did_cli.evaluation.nll import eval_nll
    from did_cli.evaluation.settings import EvalSettings, NllData, NllSettings
    from did_cli.execution import optimize
    from did_cli.model import BD3LM
    from did_cli.processes import Processes, current_processes
    from did_cli.provenance import Identity, expect_drafts, expect_refinements, made_with
    from did_cli.record_files import RecordOutput
    from did_cli.records import Record, read_records
    from did_cli.settings import DraftSettings, EditSettings, FinetuneSettings, RefineSettings, UnmaskingSettings


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
