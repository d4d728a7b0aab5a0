"""Evaluation: generative perplexity, entropy and MAUVE under a judge LM, and the model's own likelihood bound.

One job per module: `scoring` (pure windows, NLLs, entropy, aggregation), `samples` (sample files and the one rule
that turns a record into a judged sample), `gen_ppl` (the one scoring path and `eval_ppl`), `judge` (loading the
judge LM), `mauve` (MAUVE from judge features), `nll` (`eval_nll`: the NELBO per block size), `nll_rows` (the rows it
scores), `zero_shot` (upstream's zero-shot presets) and `settings` (what eval-ppl and eval-nll are asked, torch-free).
"""

from __future__ import annotations

from did_cli.lazy import lazy_exports

# Loaded on first use (PEP 562): importing one light module of this package (the CLI's option lists) must not
# import torch.
_EXPORTS = {
    "EvalResult": "did_cli.evaluation.gen_ppl",
    "EvalSettings": "did_cli.evaluation.settings",
    "ReferenceMauve": "did_cli.evaluation.gen_ppl",
    "eval_ppl": "did_cli.evaluation.gen_ppl",
    "score_file": "did_cli.evaluation.gen_ppl",
    "score_samples": "did_cli.evaluation.gen_ppl",
    "DEFAULT_JUDGE": "did_cli.evaluation.settings",
    "Judge": "did_cli.evaluation.judge",
    "load_judge": "did_cli.evaluation.judge",
    "NllResult": "did_cli.evaluation.nll",
    "NllSettings": "did_cli.evaluation.settings",
    "eval_nll": "did_cli.evaluation.nll",
    "NllData": "did_cli.evaluation.settings",
    "Sample": "did_cli.evaluation.samples",
    "read_reference": "did_cli.evaluation.samples",
    "read_samples": "did_cli.evaluation.samples",
    "sample_from_record": "did_cli.evaluation.samples",
    "FileResult": "did_cli.evaluation.scoring",
    "SampleResult": "did_cli.evaluation.scoring",
    "Window": "did_cli.evaluation.scoring",
    "degenerate_threshold": "did_cli.evaluation.scoring",
    "score_sequence": "did_cli.evaluation.scoring",
    "sliding_windows": "did_cli.evaluation.scoring",
    "summarize": "did_cli.evaluation.scoring",
    "target_nlls": "did_cli.evaluation.scoring",
    "unigram_entropy": "did_cli.evaluation.scoring",
}

__all__ = [
    "DEFAULT_JUDGE",
    "EvalResult",
    "EvalSettings",
    "FileResult",
    "Judge",
    "NllData",
    "NllResult",
    "NllSettings",
    "ReferenceMauve",
    "Sample",
    "SampleResult",
    "Window",
    "degenerate_threshold",
    "eval_nll",
    "eval_ppl",
    "load_judge",
    "read_reference",
    "read_samples",
    "sample_from_record",
    "score_file",
    "score_samples",
    "score_sequence",
    "sliding_windows",
    "summarize",
    "target_nlls",
    "unigram_entropy",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
