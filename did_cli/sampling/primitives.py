"""Sampling primitives: per-sample random streams, the nucleus filter and categorical draws in float64.

Randomness is drawn per sample from a generator seeded by (seed, sample id, stage), never from a shared batch
generator: a sample then depends only on its own id, so batch size and batch composition cannot change it. Every
uniform a stage needs is drawn up front, indexed by position, which keeps the draw count independent of the batch.

Tokens are drawn by inverse-CDF sampling in float64 over the nucleus-filtered distribution. Float64 matters: float32
categorical sampling truncates the tail, lowers entropy and flatters generative perplexity (Zheng et al.).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch


def sample_seed(seed: int, sample_id: int, stage: int, attempt: int = 0, purpose: str = "") -> int:
    """A 63-bit seed for one sample at one stage and attempt, by hashing: no two such tuples share a stream.

    Attempt 0 is the first draw; a sample redrawn after entropy rejection uses attempt 1, 2, ... so a redraw depends
    only on (seed, id, attempt) and never on which other samples were rejected. A `purpose` (`mc-dropout:3`, say)
    names a stream of its own, so measures that need randomness never take uniforms from the sampler's streams.
    """
    key = f"did:{seed}:{sample_id}:{stage}" + (f":try{attempt}" if attempt else "") + (f":{purpose}" if purpose else "")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_uniforms(
    seed: int,
    sample_ids: list[int],
    stage: int,
    length: int,
    count: int,
    device: torch.device | str = "cpu",
    attempt: int = 0,
    purpose: str = "",
) -> torch.Tensor:
    """Uniforms in [0, 1) for every sample and position.

    Args:
        seed: the run's seed.
        sample_ids: ids of the samples in this batch.
        stage: stage index (0 for the draft), so chained stages use fresh streams.
        length: positions per sample (L).
        count: uniforms per position.
        device: where the result goes.
        attempt: 0 for a first draw, k for the k-th redraw of a rejected sample.
        purpose: a stream of its own (see `sample_seed`); "" is the sampler's.

    Returns:
        [B, L, count] float64.
    """
    draws = []
    for sample_id in sample_ids:
        generator = torch.Generator().manual_seed(sample_seed(seed, sample_id, stage, attempt, purpose))
        draws.append(torch.rand(length, count, generator=generator, dtype=torch.float64))
    return torch.stack(draws).to(device)


class Snapshot(NamedTuple):
    """What one model call says about the tokens it commits: the draws and how sure the model was of them.

    Every measure is of the untempered, unfiltered distribution the model gave at the call (SUBS: [MASK] and padded
    rows removed), before temperature and the nucleus: the paper's snapshot confidence and two more read off the same
    logits at no extra model call.

    Attributes:
        tokens: [N] int64 drawn ids.
        confidence: [N] float32, the probability of the drawn id.
        entropy: [N] float32, the distribution's entropy in nats (0: certain).
        margin: [N] float32, top-1 minus top-2 probability (1: certain).
    """

    tokens: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    margin: torch.Tensor


def snapshot(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    mask_id: int,
    top_p: float = 1.0,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> Snapshot:
    """Draw one token per row and report the model's probability of it, its entropy and its top-1/top-2 margin.

    The [MASK] logit is removed first (SUBS: the denoiser never predicts [MASK]). The nucleus keeps the most
    probable tokens while their cumulative probability is at most `top_p`, and always the top one: BD3-LM's rule,
    kept so generative perplexity stays comparable with published numbers.

    Args:
        logits: [N, V] raw logits (any float dtype).
        uniforms: [N] float64 uniforms in [0, 1), one per row.
        mask_id: the [MASK] id.
        vocab_size: the tokenizer's ids (one past the largest); the rows beyond it (an embedding padded to a multiple
            of 64, say) are never drawn, so every sampled id decodes. None: every row but [MASK].
        top_p: nucleus mass in (0, 1]; 1 disables the filter.
        temperature: divides the logits before the nucleus filter.

    Returns:
        A Snapshot; its measures never change which tokens are drawn.
    """
    logits = logits.double()
    logits[:, mask_id] = float("-inf")
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[:, vocab_size:] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    tokens = _draw(logits, probs, uniforms, top_p, temperature)
    confidence = probs.gather(-1, tokens[:, None]).squeeze(-1).float()
    entropy = torch.special.entr(probs).sum(dim=-1).float()  # entr(0) = 0: removed rows add nothing
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = (top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]).float()
    return Snapshot(tokens, confidence, entropy, margin)


def sample_from_logits(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    mask_id: int,
    top_p: float = 1.0,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`snapshot`'s tokens [N] int64 and confidence [N] float32 alone (the snapshot confidence of the paper)."""
    drawn = snapshot(logits, uniforms, mask_id=mask_id, top_p=top_p, temperature=temperature, vocab_size=vocab_size)
    return drawn.tokens, drawn.confidence


def _draw(
    logits: torch.Tensor, probs: torch.Tensor, uniforms: torch.Tensor, top_p: float, temperature: float
) -> torch.Tensor:
    """Inverse-CDF draws [N] from the tempered, nucleus-filtered distribution of float64 `logits` [N, V]."""
    # Shift before dividing: (z - max z) / T is at most 0 for any T > 0, so a tiny temperature tends to greedy
    # decoding instead of overflowing to inf - inf = NaN (which drew the last slot, [MASK]).
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    sampling = probs if temperature == 1.0 else torch.softmax(shifted / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = _descending(sampling, top_p)
        keep = sorted_probs.cumsum(dim=-1) <= top_p
        keep[:, 0] = True
        sorted_probs = sorted_probs * keep
    else:
        sorted_probs, order = sampling, None
    cumulative = sorted_probs.cumsum(dim=-1)
    target = uniforms[:, None] * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, target, right=True).clamp_(max=cumulative.shape[-1] - 1)
    # searchsorted can land on a zero-probability slot only through rounding at the very top; step back to the
    # last kept token so a filtered-out token is never drawn.
    if order is not None:
        index = torch.minimum(index, keep.sum(dim=-1, keepdim=True) - 1)
        return order.gather(-1, index).squeeze(-1)
    drawn_nothing = ~(sampling.gather(-1, index) > 0)  # zero, or NaN from non-finite logits
    return torch.where(drawn_nothing, sampling.argmax(dim=-1, keepdim=True), index).squeeze(-1)


def _descending(probs: torch.Tensor, top_p: float, first_k: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable tokens in descending order, enough of them to contain every row's nucleus.

    On the CPU a full sort of a 50k vocabulary costs milliseconds per row, far more than the model call of a small
    draft block, while a nucleus of p = 0.9 usually lies in the top few hundred tokens: take the top k, and widen k
    only when some row's top k still holds at most `top_p` of the mass. On CUDA the full sort is cheap and, unlike
    the check, needs no device sync.
    """
    vocab = probs.shape[-1]
    if probs.is_cuda:
        return torch.sort(probs, dim=-1, descending=True)
    if first_k < vocab:
        values, order = torch.topk(probs, first_k, dim=-1, sorted=True)
        if bool((values.sum(dim=-1) > top_p).all()):
            return values, order
    return torch.sort(probs, dim=-1, descending=True)  # a flat distribution: the nucleus is most of the vocabulary


def window_entropy(tokens: torch.Tensor, end: int, window: int) -> torch.Tensor:
    """Unigram entropy (nats) of each row's `window` tokens before `end`, without a device sync.

    With p(v) the frequency of token v in the window, H = -sum_v p(v) log p(v) = -mean over positions of
    log p(token at that position), which needs only each position's count: a fixed-shape computation, so the
    result can stay on the device until someone reads it.

    Args:
        tokens: [B, L] int64.
        end: one past the window's last position (window <= end <= L).
        window: tokens in the window (W).

    Returns:
        [B] float64 entropies, on the tokens' device.
    """
    span = tokens[:, end - window : end]  # B, W
    counts = (span[:, :, None] == span[:, None, :]).sum(dim=-1).double()  # B, W: occurrences of each position's token
    return -(counts / window).log().mean(dim=-1)
