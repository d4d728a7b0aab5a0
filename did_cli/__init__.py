"""did: Diffusion in Diffusion for BD3-LM block diffusion language models.

Draft with a small block size and a KV cache while recording each token's snapshot confidence, then remask the
least confident tokens and re-denoise them with a global block (arXiv 2601.13599).
"""

from did_cli.api import draft, eval_ppl, finetune, generate, optimize, refine, run_sweep
from did_cli.checkpoints import load_model, load_tokenizer, save_model
from did_cli.config import DraftSettings, FinetuneSettings, ModelConfig, RefineSettings, UnmaskingSettings
from did_cli.errors import DidError
from did_cli.evaluation import EvalSettings
from did_cli.model import BD3LM
from did_cli.records import Record, read_records
from did_cli.sweep import SweepSettings

__all__ = [
    "BD3LM",
    "DidError",
    "DraftSettings",
    "EvalSettings",
    "FinetuneSettings",
    "ModelConfig",
    "Record",
    "RefineSettings",
    "SweepSettings",
    "UnmaskingSettings",
    "draft",
    "eval_ppl",
    "finetune",
    "generate",
    "load_model",
    "load_tokenizer",
    "optimize",
    "read_records",
    "refine",
    "run_sweep",
    "save_model",
]
