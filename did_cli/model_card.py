"""The README.md model card of a checkpoint folder: Hub metadata, what the model is, what did measured, how to load it.

The card is rendered from facts, never from typed numbers: the folder's `ModelConfig` (shape, block sizes, mix and
noise intervals the export recorded), the run's files (`TrainingFacts`, which `did_cli.hub` reads from settings.json
and summary.json) and the evaluation outputs did wrote for these weights (`NllEvaluation` from `did eval-nll --json`,
`GenPplEvaluation` from `did eval-ppl --json`). A section appears only when its facts exist, so a card never reports
an evaluation that was not run. `save_model` writes the card from the config alone; `did finetune` rewrites it with
the run's facts when the run ends, and `did push` with the evaluations it is given.

The line after the metadata (`MARKER`) marks a card as did's: did rewrites only cards that carry it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from did_cli.config import AUTO_MAP, BD3LM_CODE_REPOSITORY, BD3LM_CODE_REVISION, ModelConfig

__all__ = ["MARKER", "GenPplEvaluation", "NllEvaluation", "TrainingFacts", "is_did_card", "render_card"]

MARKER = "<!-- model card written by did: `did push` rewrites it from the run's files and evaluation outputs -->"
TAGS = ("diffusion", "block-diffusion", "bd3lm", "did")
PAPER = "https://arxiv.org/abs/2503.09573"
DID_PAPER = "https://arxiv.org/abs/2601.13599"
# Placeholder for the repository id in a card written before the folder is pushed; `did push` fills it in.
REPO_PLACEHOLDER = "<repo-id>"


@dataclass(frozen=True)
class TrainingFacts:
    """How a `did finetune` run made the weights, as its settings.json and summary.json record it.

    Attributes:
        steps: optimizer steps of the run.
        mix: the block-size mix (`--mix`).
        batch_size: global batch (rows per step) at the end of the run.
        length: row length in tokens at the end of the run.
        tokens_seen: tokens of all training rows, steps x batch x length summed over any settings changes.
        start: what the run started from: a Hub id, a local folder, or a fresh preset.
        base_model: the Hub id the run started from (card metadata); None for a fresh model or a local folder.
        data: the training data as given (`--data`, with `--data-config`).
        hub_dataset: the Hub dataset id (card metadata); None for local files.
        data_digest: did's fingerprint of the tokenised corpus (spec, file contents, tokenizer); None if not recorded.
        train_tokens: tokens in the training split of the corpus.
        validation_nelbo: validation NELBO per block size at the end of the run (summary.json); empty without one.
        did_version: the did version that trained.
        changes: settings changed on resume, one line each (settings.json `overrides`).
    """

    steps: int
    mix: str
    batch_size: int
    length: int
    tokens_seen: int
    start: str
    base_model: str | None = None
    data: str = ""
    hub_dataset: str | None = None
    data_digest: str | None = None
    train_tokens: int | None = None
    validation_nelbo: dict[int, float] = field(default_factory=dict)
    did_version: str | None = None
    changes: tuple[str, ...] = ()


@dataclass(frozen=True)
class NllEvaluation:
    """This model's rows of a `did eval-nll --json` file.

    Attributes:
        file: the file's name, as the card cites it.
        results: its `results` entries for these weights (block_size, nelbo, ppl_bound, stderr, sequences, tokens,
            exact_nll, clip).
        data: its `data` entry for these weights (source, layout, seq_len, rows, fingerprint).
        settings: its `settings` (noise_draws, seed, noise_layout, ...).
    """

    file: str
    results: tuple[dict[str, Any], ...]
    data: dict[str, Any]
    settings: dict[str, Any]


@dataclass(frozen=True)
class GenPplEvaluation:
    """One sample file of a `did eval-ppl --json` file whose every stage these weights made.

    Attributes:
        file: the eval-ppl JSON file's name.
        samples: the sample file's name, as eval-ppl recorded it.
        stages: the sampling stages of its records, as settings (kind, block_size, gamma, top_p, ...).
        numbers: gen_ppl, gen_ppl_pooled, entropy, num_samples, num_degenerate, mean_tokens.
        judge: the judge's name.
        settings: eval-ppl's settings (context, stride, max_tokens, ...).
    """

    file: str
    samples: str
    stages: tuple[dict[str, Any], ...]
    numbers: dict[str, Any]
    judge: str
    settings: dict[str, Any]


def is_did_card(text: str) -> bool:
    """Whether a README.md is a card did wrote (and may rewrite)."""
    return MARKER in text


def render_card(
    config: ModelConfig,
    *,
    repo_id: str | None = None,
    training: TrainingFacts | None = None,
    nll: Sequence[NllEvaluation] = (),
    gen_ppl: Sequence[GenPplEvaluation] = (),
    has_tokenizer_files: bool = True,
    weights_dtype: str | None = None,
    license_id: str | None = None,
) -> str:
    """The README.md text of a checkpoint folder.

    Args:
        config: the folder's config.
        repo_id: the Hub repository the card is for (usage snippets); a placeholder when None.
        training: the run's facts, when the folder is a run's `final/`.
        nll: eval-nll results for these weights.
        gen_ppl: eval-ppl results of samples these weights made.
        has_tokenizer_files: whether the folder ships its tokenizer (else the config names it).
        weights_dtype: the stored weights' dtype (e.g. "float32").
        license_id: a license id for the metadata (e.g. apache-2.0), when the user gave one.

    Returns:
        Markdown with YAML front matter.
    """
    repo = repo_id or REPO_PLACEHOLDER
    parts = [
        _front_matter(config, training, license_id),
        MARKER,
        "",
        f"# {repo_id or 'BD3-LM checkpoint'}",
        "",
        _summary(config, training),
        _model_section(config, has_tokenizer_files, weights_dtype),
        _training_section(config, training),
        _evaluation_section(training, nll, gen_ppl),
        _usage_section(config, repo, has_tokenizer_files),
    ]
    return "\n".join(part for part in parts if part is not None).rstrip("\n") + "\n"


def _did_version() -> str | None:
    # Read here, not through did_cli.provenance: provenance sits above checkpoints, which writes cards.
    try:
        return metadata.version("did")
    except metadata.PackageNotFoundError:
        return None


def _front_matter(config: ModelConfig, training: TrainingFacts | None, license_id: str | None) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        # transformers loads the folder (trust_remote_code) whenever BD3-LM's modeling code can rebuild it.
        library_name="transformers" if config.bd3lm_code_problem() is None else "did",
        tags=list(TAGS),
        base_model=training.base_model if training is not None else None,
        datasets=[training.hub_dataset] if training is not None and training.hub_dataset else None,
        license=license_id,
    )
    return f"---\n{data.to_yaml()}\n---"


def _summary(config: ModelConfig, training: TrainingFacts | None) -> str:
    version = _did_version()
    tool = f"did {version}" if version else "did"
    what = f"A BD3-LM block diffusion language model ([Block Diffusion]({PAPER}))"
    did = f"{tool}, a toolkit for [Diffusion in Diffusion]({DID_PAPER})"
    if training is None:
        return f"{what}, saved by {did}.\n"
    return (
        f"{what}, trained by {did}: mix-scale block-diffusion training, with the block size drawn per step from "
        f"`{training.mix}`. Draft with small blocks, then revise the least confident tokens with one global block "
        "(`did generate`).\n"
    )


def _table(rows: Sequence[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]) + "\n"


def _model_section(config: ModelConfig, has_tokenizer_files: bool, weights_dtype: str | None) -> str:
    tokenizer = "shipped in this repository" if has_tokenizer_files else f"`{config.tokenizer or 'gpt2'}`"
    rows = [
        ("architecture", "BD3-LM DiT: adaLN blocks, rotary attention, time-independent (sigma = 0)"),
        ("parameters", f"{config.num_parameters():,}"),
        ("blocks x width x heads", f"{config.n_blocks} x {config.hidden_dim} x {config.n_heads}"),
        ("adaLN conditioning width", str(config.cond_dim)),
        ("context length", f"{config.model_length} tokens"),
        ("vocabulary", f"{config.vocab_size} ids, [MASK] = {config.mask_id}"),
        ("tokenizer", tokenizer),
        ("block size in config.json", f"{config.block_size} (any block size can be sampled)"),
    ]
    if weights_dtype:
        rows.append(("weights", f"{weights_dtype} safetensors"))
    problem = config.bd3lm_code_problem()
    if problem is not None:
        rows.append(("transformers", f"not loadable with BD3-LM's code ({problem}); load it with did"))
    return "## Model\n\n" + _table(rows)


def _training_section(config: ModelConfig, training: TrainingFacts | None) -> str | None:
    mix = training.mix if training is not None else config.extra.get("did_training_mix")
    if mix is None:
        return None
    rows = [("block-size mix", f"`{mix}`")]
    clips = config.extra.get("did_training_clip")
    if isinstance(clips, dict) and clips:
        rows.append(("noise interval per block size", ", ".join(f"B={k}: {v}" for k, v in clips.items())))
    if training is not None:
        rows += [
            ("started from", training.start),
            ("optimizer steps", f"{training.steps:,}"),
            ("global batch x length", f"{training.batch_size} x {training.length} tokens"),
            ("tokens seen", f"{training.tokens_seen:,}"),
            ("data", f"`{training.data}`"),
        ]
        if training.train_tokens is not None:
            rows.append(("training split", f"{training.train_tokens:,} tokens"))
        if training.data_digest:
            rows.append(("data digest", f"`{training.data_digest}` (did's fingerprint of the tokenised corpus)"))
        if training.did_version:
            rows.append(("trained with", f"did {training.did_version}"))
        rows += [("settings changed on resume", change) for change in training.changes]
    return "## Training\n\n" + _table(rows)


def _evaluation_section(
    training: TrainingFacts | None, nll: Sequence[NllEvaluation], gen_ppl: Sequence[GenPplEvaluation]
) -> str | None:
    parts = []
    if training is not None and training.validation_nelbo:
        lines = ["| block size | NELBO (nats/token) | PPL bound |", "|---|---|---|"]
        for size, value in sorted(training.validation_nelbo.items()):
            lines.append(f"| {size} | {value:.4f} | {_exp(value)} |")
        parts.append(
            "### Validation NELBO (`did finetune`)\n\nOn the run's held-out data at the last step, as summary.json "
            "records it.\n\n" + "\n".join(lines) + "\n"
        )
    parts += [_nll_part(evaluation) for evaluation in nll]
    if gen_ppl:
        parts.append(_gen_ppl_part(gen_ppl))
    if not parts:
        return None
    return "## Evaluation\n\n" + "\n".join(parts)


def _exp(nelbo: float) -> str:
    return f"{math.exp(nelbo):.2f}" if nelbo < 700 else "inf"


def _nll_part(evaluation: NllEvaluation) -> str:
    lines = [
        "| block size | NELBO (nats/token) | ± s.e. | PPL bound | sequences | tokens |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(evaluation.results, key=lambda r: r["block_size"]):
        stderr = f"{row['stderr']:.4f}" if row.get("stderr") is not None else "n/a"
        bound = f"{row['ppl_bound']:.2f}" + (" (exact NLL)" if row.get("exact_nll") else "")
        lines.append(
            f"| {row['block_size']} | {row['nelbo']:.4f} | {stderr} | {bound} | {row['sequences']:,} | "
            f"{row['tokens']:,} |"
        )
    data, settings = evaluation.data, evaluation.settings
    source = data.get("source", {})
    name = source.get("source", "?") if isinstance(source, dict) else str(source)
    split = f", split `{source['split']}`" if isinstance(source, dict) and source.get("split") else ""
    clip = settings.get("clip") or "unclipped t ~ U[1e-3, 1]"
    described = (
        f"Data `{name}`{split}, {data.get('layout', '?')} rows of {data.get('seq_len', '?')} tokens "
        f"(fingerprint `{data.get('fingerprint', '?')}`); {settings.get('noise_draws', '?')} noise draw(s) per row, "
        f"seed {settings.get('seed', '?')}, {settings.get('noise_layout', 'row')} noise layout, {clip}."
    )
    return f"### Likelihood bound (`did eval-nll`, {evaluation.file})\n\n{described}\n\n" + "\n".join(lines) + "\n"


def _stages(stages: Sequence[dict[str, Any]]) -> str:
    described = []
    for stage in stages:
        if stage.get("kind") == "draft":
            described.append(f"draft B={stage.get('block_size')}, top-p {stage.get('top_p')}")
        elif stage.get("kind") == "refine":
            described.append(f"refine {stage.get('remask')} γ={stage.get('gamma')} B={stage.get('block_size')}")
        else:
            described.append(str(stage.get("kind")))
    return " → ".join(described) or "?"


def _gen_ppl_part(evaluations: Sequence[GenPplEvaluation]) -> str:
    lines = [
        "| samples | stages | gen PPL | entropy (nats) | samples scored | degenerate | judge |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in evaluations:
        numbers = e.numbers
        gen_ppl = f"{numbers['gen_ppl']:.2f}" if numbers.get("gen_ppl") is not None else "n/a"
        entropy = f"{numbers['entropy']:.3f}" if numbers.get("entropy") is not None else "n/a"
        lines.append(
            f"| `{e.samples}` | {_stages(e.stages)} | {gen_ppl} | {entropy} | {numbers.get('num_samples')} | "
            f"{numbers.get('num_degenerate')} | `{e.judge}` |"
        )
    files = sorted({e.file for e in evaluations})
    settings = evaluations[0].settings
    return (
        f"### Generative perplexity (`did eval-ppl`, {', '.join(files)})\n\n"
        f"Mean of per-sample perplexities under the judge (context {settings.get('context')}, stride "
        f"{settings.get('stride')}); entropy is the unigram entropy of the judge tokens. Read a gen PPL with its "
        "entropy: less diverse text scores lower.\n\n" + "\n".join(lines) + "\n"
    )


def _usage_section(config: ModelConfig, repo: str, has_tokenizer_files: bool) -> str:
    block = config.block_size
    did = (
        "### did\n\n```bash\n"
        f"did draft --model {repo} --length {config.model_length} --block-size {block} -n 8 --out drafts.jsonl\n"
        f"did refine drafts.jsonl --model {repo} --gamma 0.5 --out refined.jsonl\n"
        "```\n"
    )
    if config.bd3lm_code_problem() is not None:
        return "## Usage\n\n" + did + "\nBD3-LM's modeling code cannot load this checkpoint; only did can.\n"
    if has_tokenizer_files:
        tokenizer = f'PreTrainedTokenizerFast.from_pretrained("{repo}")'
        tokenizer_import = "PreTrainedTokenizerFast"
    else:
        tokenizer = f'AutoTokenizer.from_pretrained("{config.tokenizer or "gpt2"}")'
        tokenizer_import = "AutoTokenizer"
    transformers = (
        "### transformers\n\n"
        f"config.json's `auto_map` names BD3-LM's modeling code in `{BD3LM_CODE_REPOSITORY}` "
        f"(`{AUTO_MAP['AutoModelForMaskedLM']}`), so nothing but the weights is stored here. transformers runs that "
        f"code at `code_revision` (default `{BD3LM_CODE_REVISION}`): pin a commit you have read. The code needs "
        "transformers 4.x (BD3-LM pins 4.49.0; 5.x cannot load it).\n\n"
        "```python\nimport torch\n"
        f"from transformers import AutoModelForMaskedLM, {tokenizer_import}\n\n"
        "model = AutoModelForMaskedLM.from_pretrained(\n"
        f'    "{repo}", trust_remote_code=True, code_revision="{BD3LM_CODE_REVISION}", low_cpu_mem_usage=False\n'
        ").eval()\n"
        f"tokenizer = {tokenizer}\n"
        f"tokens = torch.tensor([[tokenizer.eos_token_id] + [{config.mask_id}] * {block}])  # BOS, then one masked "
        "block\n"
        f"logits = model(tokens, torch.zeros(1), sample_mode=True)  # raw logits [1, n, {config.vocab_size}], "
        f"block-causal at B={block}\n"
        "```\n"
    )
    diffusers = (
        "### diffusers (unverified)\n\n"
        "`BD3LMPipeline` is proposed in huggingface/diffusers#12911 and is not in a diffusers release yet (0.42.1 "
        "has none); did has not run it, and its signature may change. It reads the [MASK] id from config.json's "
        "`mask_index`.\n\n"
        "```python\nfrom diffusers import BD3LMPipeline\n\n"
        "pipe = BD3LMPipeline(model=model, tokenizer=tokenizer)  # model and tokenizer as above\n"
        f"print(pipe(gen_length={min(256, config.model_length - 1)}, block_length={block}).texts[0])\n"
        "```\n"
    )
    return "## Usage\n\n" + did + "\n" + transformers + "\n" + diffusers
