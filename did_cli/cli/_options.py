"""Option types shared by several commands, so the same flag means the same thing everywhere, and count checks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from did_cli.errors import UsageError

DEFAULT_MODEL = "did-tiny"  # kept equal to checkpoints.DEFAULT_MODEL (a test checks), without importing torch here
DEFAULT_BATCH_SIZE = 16
DEFAULT_JUDGE = "gpt2-large"  # kept equal to judge.DEFAULT_JUDGE (a test checks)

Model = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Embedded name, checkpoint folder, or Hugging Face Hub id. [default: did-tiny]"),
]
RecordsModel = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Embedded name, checkpoint folder, or Hub id. [default: the model the records name]",
    ),
]
Tokenizer = Annotated[
    str | None, typer.Option("--tokenizer", help="Tokenizer id or folder (default: the checkpoint's, else gpt2).")
]
Revision = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) to pin.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Weights dtype: float32, bfloat16 or float16.")]
SamplingDtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Weights dtype: float32, bfloat16 or float16. float32: tokens independent of batch size and cache use; "
        "bfloat16/float16: faster on GPU, but rounding can change tokens across batch sizes and with --no-kv-cache "
        "(--kv-cache-dtype bfloat16 is BD3-LM's closer bf16 scheme).",
    ),
]
KVCacheDtype = Annotated[
    str | None,
    typer.Option(
        "--kv-cache-dtype",
        help="KV cache dtype: float32 or bfloat16 (default: the weights' dtype). bfloat16 with --dtype float32 is "
        "BD3-LM's CUDA sampler numerics (bf16 q/k/v before rotary, fp32 attention): ~7x closer to float32 than "
        "--dtype bfloat16; like it, tokens can differ across batch sizes and with --no-kv-cache.",
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same result.")]
SamplingSeed = Annotated[int, typer.Option("--seed", help="Sample i depends only on (seed, i).")]
BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size",
        help="Samples per model call. In float32 it never changes the tokens (confidences agree to 1e-5).",
    ),
]
Out = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Write JSONL here (via OUT.partial, renamed at the end) instead of stdout."),
]
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Keep the finished samples of an interrupted run in --out and make only the rest."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus mass (BD3-LM's protocol uses 0.9).")]
Temperature = Annotated[float, typer.Option("--temperature", help="Softmax temperature for sampling.")]
Order = Annotated[
    str | None,
    typer.Option(
        "--order",
        help="Unmasking order: first-hitting (one random position per call), steps, confidence. "
        "[default: first-hitting, or steps with --steps-per-block]",
    ),
]
StepsPerBlock = Annotated[
    int | None, typer.Option("--steps-per-block", help="Fixed steps per block (the steps order only).")
]
TokensPerCall = Annotated[
    int, typer.Option("--tokens-per-call", help="Tokens committed per model call (1 = BD3-LM; not with steps).")
]
ConfidenceThreshold = Annotated[
    float | None,
    typer.Option(
        "--confidence-threshold",
        help="Commit every masked position of the block whose sampled token's probability exceeds this, at least "
        "the most confident one per call (implies --order confidence; calls go where the model is unsure).",
    ),
]
RefineCache = Annotated[
    int,
    typer.Option(
        "--refine-cache",
        help="Recompute kept positions' keys/values only every R calls of the global refine block (approximate; "
        "1 = exact, the default).",
    ),
]
NoKVCache = Annotated[bool, typer.Option("--no-kv-cache", help="Recompute the prefix at every call (slow oracle).")]
AttnBackend = Annotated[
    str, typer.Option("--attn-backend", help="Attention kernels: auto (flex on CUDA, sdpa elsewhere), sdpa or flex.")
]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the denoiser (compiled once per block size).")]
CudaGraphs = Annotated[
    bool, typer.Option("--cuda-graphs", help="Replay cached decoding calls from captured CUDA graphs (CUDA only).")
]
Force = Annotated[bool, typer.Option("--force", help="Refine records made with another model or tokenizer.")]

# Sampling commands (draft, generate).
NumSamples = Annotated[int, typer.Option("--num-samples", "-n", help="Samples to draw (per prompt).")]
Length = Annotated[
    int | None, typer.Option("--length", help="Sequence length incl. BOS/prompt (default: the model's).")
]
Prompt = Annotated[str | None, typer.Option("--prompt", help="Condition every sample on this text.")]
PromptFile = Annotated[Path | None, typer.Option("--prompt-file", help="One prompt per line (UTF-8).")]
RejectEntropy = Annotated[
    float,
    typer.Option(
        "--reject-entropy",
        help="Redraw a sample whose last 256 tokens fall below this unigram entropy (nats), as BD3-LM; 0 = off.",
    ),
]
MaxTries = Annotated[int, typer.Option("--max-tries", help="Draws per sample before failing (BD3-LM: 10).")]
VarLength = Annotated[
    bool,
    typer.Option(
        "--var-length",
        help="Cut each sample after its first generated EOS, kept; checked as BD3-LM's var_length: only once a sample "
        "is longer than 256 tokens, after each block (at block size 1 a stopped sample is redrawn).",
    ),
]

# Scoring commands (eval-ppl, sweep).
DegenerateEntropy = Annotated[
    float,
    typer.Option(
        "--degenerate-entropy",
        help="Count samples whose unigram entropy (nats) is below this; the bar at 256+ tokens (BD3-LM's 4.0), "
        "scaled by log n / log 256 for an n-token sample (3.5 at 128 tokens).",
    ),
]


def check_count(value: int | None, flag: str) -> None:
    """Refuse a count (samples, batch size, draws) below 1, or beyond what a process can index (None: unset).

    Raises:
        UsageError: naming the flag and the value.
    """
    if value is None:
        return
    if value < 1:
        raise UsageError(f"{flag} must be at least 1, got {value}")
    if value > sys.maxsize:
        raise UsageError(f"{flag} {value} is too large; it must be at most {sys.maxsize}")


# Revision stages (refine, generate): the remask strategies beyond snapshot confidence, and editing.
REMASK_HELP = (
    "Which tokens to remask: snapshot (the paper's), snapshot-entropy, snapshot-margin (free: recorded with each "
    "token), posthoc, energy (one scoring pass), mc-dropout, mc-variance, noise-ensemble (--passes scoring passes) "
    "or random."
)
Passes = Annotated[
    int,
    typer.Option(
        "--passes", help="Scoring passes M of --remask mc-dropout, mc-variance and noise-ensemble (M model calls)."
    ),
]
EnsembleRatio = Annotated[
    float,
    typer.Option("--ensemble-ratio", help="Share of generated tokens each --remask noise-ensemble pass masks."),
]
EditThreshold = Annotated[
    float | None,
    typer.Option(
        "--edit-threshold",
        help="Edit instead of remasking: replace a committed token where a global pass's candidate differs from it "
        "with a probability above this (LLaDA 2.x's editing, applied to the whole sample; 1 changes nothing).",
    ),
]
EditPasses = Annotated[int, typer.Option("--edit-passes", help="Global passes of --edit-threshold (R model calls).")]
EditCandidate = Annotated[
    str,
    typer.Option(
        "--edit-candidate", help="The token an edit proposes: argmax, or sampled (with --top-p, --temperature)."
    ),
]


def given(ctx: typer.Context, *names: str) -> list[str]:
    """The parameters among `names` the command line set (a default is not a choice the user made)."""
    chosen = []
    for name in names:
        # Compared by name: Typer 0.12-0.2x ships click's ParameterSource either from click or from its own copy.
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            chosen.append(name)
    return chosen


def flag(name: str) -> str:
    """The option of a parameter name (`edit_threshold` -> `--edit-threshold`)."""
    return "--" + name.replace("_", "-")
