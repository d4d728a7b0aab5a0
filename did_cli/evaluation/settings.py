"""What `eval-ppl` and `eval-nll` are asked to do, checked without importing torch.

`EvalSettings` (how samples are scored under a judge), `NllSettings` (how the likelihood bound is estimated) and
`NllData` (which rows it scores) check their values in `__post_init__`; they live apart from the scoring code so the
CLI refuses a bad option before torch loads. The scoring modules re-export them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from did_cli.errors import UsageError

if TYPE_CHECKING:
    from did_cli.noise import ClipSpec

__all__ = ["DEFAULT_JUDGE", "EvalSettings", "NllData", "NllSettings"]

# The judge of every published gen PPL number for BD3-LM and DiD.
DEFAULT_JUDGE = "gpt2-large"


@dataclass(frozen=True)
class EvalSettings:
    """How samples are scored.

    Attributes:
        context: most tokens the judge sees at once (capped at the judge's own limit); 1024 upstream.
        stride: tokens each later sliding window advances; None means half the context (512 upstream).
        batch_size: windows per judge call. Changes speed and memory, not the numbers (beyond float noise).
        degenerate_entropy: samples with a unigram entropy (nats) below this are counted as degenerate; it is
            the threshold at 256 tokens or more, scaled down for shorter samples (see `degenerate_threshold`).
        max_tokens: cut each sample's judge ids (BOS included) to this many, as upstream's `max_length`. None: a did
            record's own length (its draft length), `gen_ppl.PLAIN_TEXT_MAX_TOKENS` for other texts; 0: never cut.
        clean_up_spaces: apply transformers' `clean_up_tokenization` to each text before re-tokenising it, which
            is what decoding with `clean_up_tokenization_spaces=True` (the paper-era default) would have produced.
    """

    context: int = 1024
    stride: int | None = None
    batch_size: int = 8
    degenerate_entropy: float = 4.0
    max_tokens: int | None = None
    clean_up_spaces: bool = False

    def __post_init__(self) -> None:
        if self.context < 2:
            raise UsageError(f"--context must be at least 2 tokens, got {self.context}")
        if self.stride is not None and self.stride < 1:
            raise UsageError(f"--stride must be at least 1, got {self.stride}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise UsageError(f"--max-tokens must be at least 0 (0 scores everything), got {self.max_tokens}")
        if not (math.isfinite(self.degenerate_entropy) and self.degenerate_entropy >= 0):
            raise UsageError(
                f"--degenerate-entropy must be a finite number of nats >= 0, got {self.degenerate_entropy}"
            )

    def windows_for(self, max_positions: int | None) -> tuple[int, int]:
        """The (context, stride) used with a judge that accepts at most `max_positions` tokens."""
        context = min(self.context, max_positions) if max_positions else self.context
        stride = self.stride if self.stride is not None else context // 2
        if stride >= context:
            raise UsageError(f"--stride {stride} must be smaller than the context of {context} tokens")
        return context, stride


@dataclass(frozen=True)
class NllSettings:
    """How `eval_nll` estimates the bound.

    Attributes:
        block_sizes: block sizes to evaluate (sizes at least L mean one global block, the MDLM bound).
        noise_draws: noise draws (t and masks) per row, averaged; more lowers the standard error.
        batch_size: sequences (rows x noise draws) per forward pass; never changes the result.
        seed: the noise of row i at block size B depends only on (seed, i, B).
        clip: None for the unclipped schedule t ~ U[1e-3, 1] (the true bound), else an interval or intervals per
            block size (a biased estimate, what training with `--clip` optimises).
        exact_block_1: at B = 1 score the exact NLL (t = 1), the expectation of the B = 1 NELBO, as upstream does.
        noise_layout: `row` (t stratified over each row's draws x blocks, from (seed, row, B): the default) or
            `batch` (upstream's and training validation's layout: t stratified over consecutive groups of
            `batch_size` rows x blocks, one draw, so the number depends on the batch size as upstream's does).
    """

    block_sizes: tuple[int, ...] = (4, 16, 1024)
    noise_draws: int = 1
    batch_size: int = 16
    seed: int = 0
    clip: ClipSpec | None = None
    exact_block_1: bool = True
    noise_layout: str = "row"

    def __post_init__(self) -> None:
        if self.noise_layout not in ("row", "batch"):
            raise UsageError(f"--noise-layout must be row or batch, got {self.noise_layout!r}")
        if self.noise_layout == "batch" and self.noise_draws != 1:
            raise UsageError("--noise-layout batch draws once per row, as upstream; drop --noise-draws")
        if not self.block_sizes or min(self.block_sizes) < 1:
            raise UsageError(f"--block-size needs positive sizes, got {self.block_sizes}")
        if self.noise_draws < 1 or self.batch_size < 1:
            raise UsageError("--noise-draws and --batch-size must be at least 1")


@dataclass(frozen=True)
class NllData:
    """What `eval_nll` scores.

    Attributes:
        data: a local .txt/.jsonl/.parquet file or folder, or a Hugging Face dataset id (or None with `preset`).
        preset: a zero-shot preset name (`zero_shot.PRESETS`), or None with `data`.
        config: dataset configuration (Hub datasets).
        split: dataset split (Hub datasets).
        text_field: the text column.
        txt_documents: `.txt` files: `lines` (one document per line) or `file`.
        seq_len: row length L (default: each model's length).
        layout: `wrap`, `bos-eos` or `document`; None means `bos-eos` for a preset (upstream's zero-shot rows) and
            `wrap` (training's rows) otherwise.
        num_samples: score only the first rows (default: all).
    """

    data: str | None = None
    preset: str | None = None
    config: str | None = None
    split: str = "test"
    text_field: str = "text"
    txt_documents: str = "lines"
    seq_len: int | None = None
    layout: str | None = None
    num_samples: int | None = None

    def __post_init__(self) -> None:
        if self.seq_len is not None and self.seq_len < 2:
            raise UsageError(f"seq_len must be at least 2 (BOS and one token), got {self.seq_len}")
