"""Choosing the tokens a refinement stage remasks: one score per position by a named strategy, then the bottom gamma.

Every strategy maps a batch (`RemaskInputs`) to one score per position, lower = less trusted, with the same
signature, so they are picked by name (`config.REMASK_STRATEGIES`). The selection is pure: exactly round(gamma * n)
of the n eligible generated positions, the lowest scores first, ties broken by position (the earlier first).

The strategies, with what each costs in model calls per sample:

* `snapshot`: the probability the model gave each token when it committed it (the DiD paper's choice). 0 calls.
* `snapshot-entropy`: the entropy of that same distribution, negated (a flat distribution is distrusted). 0 calls.
* `snapshot-margin`: its top-1 minus top-2 probability (a close call is distrusted). 0 calls.
* `posthoc`: each existing token's probability in one forward pass over the finished draft (the paper's baseline;
  the denoiser is trained only at masked positions, so on a clean draft it mostly reaffirms what is there). 1 call.
* `energy`: each token's raw logit minus the logsumexp of every raw logit, the unnormalised evidence: post-hoc
  confidence is the same logit normalised over the tokens that can be drawn only ([MASK] and padding removed), so the
  two rank positions alike except where the model puts mass on [MASK] or padding. 1 call.
* `mc-dropout` / `mc-variance`: the mean / negated variance of each token's post-hoc probability over M passes with
  dropout on at the model's trained rate (Gal & Ghahramani's MC dropout). M calls.
* `noise-ensemble`: each token's probability averaged over M re-maskings of the draft, each masking every generated
  position with probability `ensemble_ratio` and reading the denoiser at the masked ones (the masked-diffusion
  analogue of an ensemble); a position no re-masking covered keeps its snapshot confidence. M calls.
* `random`: uniform scores from the samples' own streams (the second baseline). 0 calls.

Every random choice (dropout masks, re-maskings) comes from a stream seeded by (seed, sample id, stage, purpose), and
every scoring pass runs one sequence at a time, so a sample's scores never depend on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from did_cli.model import BD3LM
from did_cli.sampling.primitives import draw_uniforms, sample_seed


@dataclass(frozen=True)
class RemaskInputs:
    """What a strategy may read to score a batch's positions.

    Attributes:
        tokens: [B, L] int64, the draft.
        confidence: [B, L] float32 snapshot confidence.
        entropy: [B, L] float32 snapshot entropy (nats), or None for records made before it was recorded.
        margin: [B, L] float32 snapshot top-1 minus top-2 probability, or None likewise.
        uniforms: [B, L] float64, the `random` strategy's uniforms.
        model: the denoiser.
        block_size: B2, the block size scoring passes run at.
        sample_ids: global sample ids (the streams of the random choices).
        stage: this stage's index.
        seed: the run's seed.
        passes: M, scoring passes of `mc-dropout`, `mc-variance` and `noise-ensemble`.
        ensemble_ratio: the share of generated positions each `noise-ensemble` pass masks.
        eligible: [B, L] bool, the positions that can be remasked (generated, not pinned).
    """

    tokens: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor | None
    margin: torch.Tensor | None
    uniforms: torch.Tensor
    model: BD3LM
    block_size: int
    sample_ids: list[int]
    stage: int
    seed: int
    passes: int
    ensemble_ratio: float
    eligible: torch.Tensor


ScoreFn = Callable[[RemaskInputs], torch.Tensor]


def snapshot_scores(inputs: RemaskInputs) -> torch.Tensor:
    """The confidence recorded when each token was committed (the DiD paper's choice; no model call)."""
    return inputs.confidence.double()


def snapshot_entropy_scores(inputs: RemaskInputs) -> torch.Tensor:
    """Minus the entropy of the distribution each token was committed from (no model call).

    Raises:
        ValueError: the records carry no snapshot entropy (made before did recorded it).
    """
    if inputs.entropy is None:
        raise ValueError("these records carry no snapshot entropy (made by an earlier did); redraw them")
    return -inputs.entropy.double()


def snapshot_margin_scores(inputs: RemaskInputs) -> torch.Tensor:
    """The top-1 minus top-2 probability of the distribution each token was committed from (no model call).

    Raises:
        ValueError: the records carry no snapshot margin (made before did recorded it).
    """
    if inputs.margin is None:
        raise ValueError("these records carry no snapshot margin (made by an earlier did); redraw them")
    return inputs.margin.double()


def _log_probs(
    model: BD3LM, row: torch.Tensor, targets: torch.Tensor, block_size: int, *, normalised: bool = True
) -> torch.Tensor:
    """[L] float32 log-probability of `targets` [L] under one forward pass over the sequence `row` [L].

    `normalised` removes [MASK] before the softmax (SUBS, as the sampler does); otherwise every raw row counts.
    One sequence at a time, in fp32: full [B, L, V] float64 logits would take ~16 GB at B=16, L=1024, V=50k, and a
    sequence's scores then never depend on its batch.
    """
    logits = model(row[None], block_size=block_size)[0].float()  # L, V
    if normalised:
        logits[:, model.mask_id] = float("-inf")
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.inference_mode()
def posthoc_scores(inputs: RemaskInputs) -> torch.Tensor:
    """The probability of each existing token in one forward pass over the finished draft (one call)."""
    rows = [_log_probs(inputs.model, row, row, inputs.block_size) for row in inputs.tokens]
    return torch.stack(rows).double().exp()


@torch.inference_mode()
def energy_scores(inputs: RemaskInputs) -> torch.Tensor:
    """Each token's raw logit minus the logsumexp of all raw logits, [MASK] included (one call)."""
    rows = [_log_probs(inputs.model, row, row, inputs.block_size, normalised=False) for row in inputs.tokens]
    return torch.stack(rows).double()


def _dropout_probs(inputs: RemaskInputs) -> torch.Tensor:
    """[M, B, L] float64: each token's post-hoc probability in M passes with dropout on, seeded per sample and pass."""
    model = inputs.model
    was_training = model.training
    devices = [model.device] if model.device.type == "cuda" else []
    passes = []
    try:
        model.train()  # dropout on at its trained rate; nothing else in the model depends on the mode
        for m in range(inputs.passes):
            rows = []
            for sample_id, row in zip(inputs.sample_ids, inputs.tokens, strict=True):
                # The global generator drives torch's dropout; forked and seeded, it is this sample's stream alone
                # and is put back as it was afterwards.
                with torch.random.fork_rng(devices=devices), torch.inference_mode():
                    torch.manual_seed(sample_seed(inputs.seed, sample_id, inputs.stage, purpose=f"mc-dropout:{m}"))
                    rows.append(_log_probs(model, row, row, inputs.block_size))
            passes.append(torch.stack(rows).double().exp())
    finally:
        model.train(was_training)
    return torch.stack(passes)


def mc_dropout_scores(inputs: RemaskInputs) -> torch.Tensor:
    """Each token's mean post-hoc probability over M passes with dropout on (M calls).

    The mean is taken as the first pass plus the mean deviation from it, so that M equal passes (dropout 0) give the
    post-hoc probability exactly, not up to the rounding of a sum divided by M.
    """
    probs = _dropout_probs(inputs)
    return probs[0] + (probs - probs[0]).mean(dim=0)


def mc_variance_scores(inputs: RemaskInputs) -> torch.Tensor:
    """Minus the variance of each token's post-hoc probability over M passes with dropout on (M calls)."""
    return -_dropout_probs(inputs).var(dim=0, correction=0)


def ensemble_probs(model: BD3LM, tokens: torch.Tensor, masks: torch.Tensor, block_size: int) -> torch.Tensor:
    """[M, B, L] float64: the denoiser's probability of each token where pass m masks it, NaN where it does not.

    Args:
        model: the denoiser.
        tokens: [B, L] int64, the draft.
        masks: [M, B, L] bool, the positions each pass masks.
        block_size: the block size of the passes.
    """
    out = torch.full(masks.shape, float("nan"), dtype=torch.float64, device=tokens.device)
    with torch.inference_mode():
        for m, mask in enumerate(masks):
            for b, row in enumerate(tokens):
                noisy = torch.where(mask[b], model.mask_id, row)
                chosen = _log_probs(model, noisy, row, block_size).double().exp()
                out[m, b] = torch.where(mask[b], chosen, out[m, b])
    return out


def noise_ensemble_scores(inputs: RemaskInputs) -> torch.Tensor:
    """Each token's probability averaged over M re-maskings at `ensemble_ratio` (M calls).

    A position none of the M re-maskings covered keeps its snapshot confidence.
    """
    length = inputs.tokens.shape[1]
    masks = []
    for m in range(inputs.passes):
        uniforms = draw_uniforms(inputs.seed, inputs.sample_ids, inputs.stage, length, 1, purpose=f"ensemble:{m}")
        masks.append((uniforms[..., 0].to(inputs.tokens.device) < inputs.ensemble_ratio) & inputs.eligible)
    probs = ensemble_probs(inputs.model, inputs.tokens, torch.stack(masks), inputs.block_size)
    mean = probs.nanmean(dim=0)
    return torch.where(mean.isnan(), inputs.confidence.double(), mean)


def random_scores(inputs: RemaskInputs) -> torch.Tensor:
    """Uniform random scores from the samples' own streams (the second ablation baseline)."""
    return inputs.uniforms


# Keyed by `config.REMASK_STRATEGIES`, the one list of names (settings check names through `config.canonical_remask`).
STRATEGIES: dict[str, ScoreFn] = {
    "snapshot": snapshot_scores,
    "posthoc": posthoc_scores,
    "random": random_scores,
    "snapshot-entropy": snapshot_entropy_scores,
    "snapshot-margin": snapshot_margin_scores,
    "energy": energy_scores,
    "mc-dropout": mc_dropout_scores,
    "mc-variance": mc_variance_scores,
    "noise-ensemble": noise_ensemble_scores,
}
# Model calls per sample a strategy's scoring costs (M: the `passes` setting), for NFE accounting.
SCORING_CALLS: dict[str, Callable[[int], int]] = {
    "posthoc": lambda passes: 1,
    "energy": lambda passes: 1,
    "mc-dropout": lambda passes: passes,
    "mc-variance": lambda passes: passes,
    "noise-ensemble": lambda passes: passes,
}


def remask_count(num_generated: torch.Tensor, gamma: float) -> torch.Tensor:
    """round(gamma * n) with halves rounded up (Python's round() would round half to even)."""
    return torch.floor(gamma * num_generated.double() + 0.5).long()


def select_lowest(scores: torch.Tensor, eligible: torch.Tensor, gamma: float) -> torch.Tensor:
    """The positions to remask: per row, the round(gamma * n) eligible positions with the lowest scores.

    Args:
        scores: [B, L] float, lower = remask first.
        eligible: [B, L] bool, the generated positions (prompt positions are never remasked).
        gamma: fraction in [0, 1].

    Returns:
        [B, L] bool with exactly round(gamma * eligible.sum(row)) True per row.
    """
    ranked = torch.where(eligible, scores.double(), torch.full_like(scores, float("inf"), dtype=torch.float64))
    order = torch.sort(ranked, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    count = remask_count(eligible.sum(dim=-1), gamma)
    return (rank < count[:, None]) & eligible
