"""Validation of a fine-tuning run: which held-out rows, which noise, and the token-weighted NELBO they give.

BD3-LM validates with a `MeanMetric` over per-token NLLs, so its number is token-weighted: every scored token counts
once, whatever batch it sat in. `did finetune` reports the same quantity, defined so that the number depends only on
the weights, the held-out data, `--seed` and `--val-batches`, never on `--micro-batch-size` or the process count:

* Rows: the first `val_batches * VALIDATION_BATCH_ROWS` held-out rows in storage order (all of them when there are
  fewer), cut into validation batches of `VALIDATION_BATCH_ROWS` rows; the last batch may be shorter.
* Noise: per validation batch and block size, BD3-LM's layout (`objective.validation_sum`: unclipped t stratified
  over batch x blocks, position 0 clean), drawn on the CPU from (seed, batch index); the same at every validation.
* Memory: forward passes take at most `chunk_rows` rows (the micro-batch size); chunks change neither rows nor noise.
* Aggregation: NELBO sums and token counts (L - 1 per row) are added over every batch and divided once, as
  `did eval-nll` does; a short last batch weighs by its tokens, not as much as a full one.

The loop validates on the main process only (the others wait), so the number of processes cannot change it either.
`--clip auto` searches its interval on the same batches (`training.clip_search`).
"""

from __future__ import annotations

import torch

from did_cli.data import PackedRows
from did_cli.model import BD3LM
from did_cli.training.objective import validation_sum
from did_cli.training.setup import step_seed

__all__ = ["VALIDATION_BATCH_ROWS", "batch_generator", "held_out_nelbo", "validation_batches"]

# Rows per validation batch (the unit of --val-batches): the default micro-batch cap, so the paper's run
# (--batch-size 512, micro-batches of 16) validates the same 128 rows as when batches were micro-batches.
VALIDATION_BATCH_ROWS = 16


def validation_batches(rows: PackedRows, count: int, batch_rows: int = VALIDATION_BATCH_ROWS) -> list[torch.Tensor]:
    """The held-out rows validation scores: the first `count * batch_rows` in storage order, in batches.

    Args:
        rows: the held-out rows.
        count: validation batches (`--val-batches`).
        batch_rows: rows per batch.

    Returns:
        Up to `count` [n, L] int64 CPU tensors of `batch_rows` rows each (the last may have fewer; none when `rows`
        is empty).
    """
    wanted = min(count * batch_rows, rows.num_rows)
    return [rows.sequential(first, min(batch_rows, wanted - first)) for first in range(0, wanted, batch_rows)]


def batch_generator(seed: int, index: int, purpose: str = "valid") -> torch.Generator:
    """The noise source of validation batch `index` (`valid` for the NELBO, `clip:B` for the clip search)."""
    return torch.Generator().manual_seed(step_seed(seed, index, purpose))


@torch.no_grad()
def held_out_nelbo(
    model: BD3LM, batches: list[torch.Tensor], block_size: int, seed: int, chunk_rows: int | None = None
) -> float:
    """Token-weighted NELBO (nats per token) of the validation batches at one block size.

    Args:
        model: the denoiser (the loop swaps the EMA weights in).
        batches: `validation_batches(...)`, [n, L] int64 each.
        block_size: B.
        seed: the run's seed; batch i's noise comes from (seed, i).
        chunk_rows: rows per forward pass (memory only).

    Returns:
        sum of NELBO terms over every batch / sum of their tokens.

    Raises:
        ValueError: no batches (nothing to validate).
    """
    if not batches:
        raise ValueError("no validation rows")
    total, tokens = 0.0, 0
    for index, clean in enumerate(batches):
        batch_total, batch_tokens = validation_sum(model, clean, block_size, batch_generator(seed, index), chunk_rows)
        total += batch_total
        tokens += batch_tokens
    return total / tokens
