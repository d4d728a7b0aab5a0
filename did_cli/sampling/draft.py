"""Stage 1: semi-autoregressive drafting with a small block size B1 and the KV cache.

Every sample starts as its prompt (BOS alone when unconditional, as BD3-LM) followed by [MASK]s up to the length.
Blocks are denoised left to right; each token's snapshot confidence is recorded at the call that commits it.

Stop conditions follow BD3-LM's `_semi_ar_sampler` and `_check_stop_conds` (diffusion.py 1044-1050, 1059-1090),
checked after every block that holds generated tokens once the sequence so far is longer than the window (256);
before that nothing is checked, an EOS included:

* entropy rejection: a sample whose last 256 tokens have a unigram entropy below `reject_entropy` (4.0 nats) is
  discarded and drawn again from a fresh stream that depends only on (seed, id, attempt); after `max_tries` draws
  sampling fails, as upstream raises `Sampling failed`.
* variable length: a sample with a generated EOS stops and is cut just after its first one, which it keeps; on low
  entropy it stops and drops its last 256 tokens instead (this cut wins over the EOS cut). At block size 1 upstream
  redraws every stopped sample instead (its `x.shape[-1] == 1` tests the last block), and so does did.

A sample's tokens never depend on the stop rules: a variable-length sample is its fixed-length draw, cut.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from did_cli.errors import SamplingError, UsageError
from did_cli.model import BD3LM
from did_cli.sampling.denoise import CallCallback, DenoiseResult, denoise
from did_cli.sampling.primitives import draw_uniforms, window_entropy
from did_cli.settings import DraftSettings


@dataclass
class DraftResult:
    """A drafted batch.

    Attributes:
        tokens: [B, L] int64, prompt included; positions at or past `lengths[i]` are not part of sample i.
        confidence: [B, L] float32 snapshot confidence; 1.0 at prompt positions.
        entropy: [B, L] float32 snapshot entropy (nats) of the committing call's distribution; 0.0 at prompt positions.
        margin: [B, L] float32 snapshot top-1 minus top-2 probability; 1.0 at prompt positions.
        prompt_lengths: prompt tokens per sample (BOS included); these positions are never remasked.
        lengths: tokens per sample: L, or less when a variable-length sample stopped early.
        tries: draws per sample (1 unless entropy rejection redrew it).
        nfes: per-sample model calls that committed one of its tokens, in the accepted draw.
        model_calls: batched denoiser calls, rejected draws included.
        cache_calls: KV-cache append calls (no logits).
        seconds: wall-clock for the batch.
        commits: per sample, {tokens committed in one call: calls} in the accepted draw.
    """

    tokens: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    margin: torch.Tensor
    prompt_lengths: list[int]
    lengths: list[int]
    tries: list[int]
    nfes: list[int]
    model_calls: int
    cache_calls: int
    seconds: float
    commits: list[dict[int, int]]


@torch.inference_mode()
def draft(
    model: BD3LM,
    prompts: list[list[int]],
    sample_ids: list[int],
    settings: DraftSettings,
    seed: int,
    on_call: CallCallback | None = None,
    *,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> DraftResult:
    """Draft one batch, redrawing samples that entropy rejection discards.

    Args:
        model: the denoiser.
        prompts: token ids per sample, each starting with BOS (at least one token, shorter than the length).
        sample_ids: global sample ids; sample i's randomness depends only on (seed, sample_ids[i], attempt).
        settings: length, B1, cache use, unmasking and stop conditions.
        seed: the run's seed.
        on_call: optional progress callback.
        vocab_size: ids at or above it are never drawn (the tokenizer's size; see `sample_from_logits`).
        eos_id: the EOS id, needed with `settings.var_length`.

    Returns:
        A DraftResult.

    Raises:
        SamplingError: a sample was rejected in all `settings.max_tries` draws.
    """
    if len(prompts) != len(sample_ids):
        raise ValueError("one prompt per sample id is needed")
    length = settings.length
    if length > model.config.model_length:
        raise UsageError(
            f"--length {length} exceeds the model's length {model.config.model_length}; generating past the "
            "model's context (BD3-LM's sliding KV window) is not supported"
        )
    if settings.var_length and eos_id is None:
        raise UsageError("--var-length needs a tokenizer with an EOS token")
    for prompt in prompts:
        if not 1 <= len(prompt) < length:
            raise UsageError(f"a prompt of {len(prompt)} tokens leaves nothing to generate within --length {length}")
    start = time.perf_counter()
    batch = len(prompts)
    tokens = torch.full((batch, length), model.mask_id, dtype=torch.long, device=model.device)
    confidence = torch.zeros(batch, length, device=model.device)
    entropy, margin = torch.zeros_like(confidence), torch.ones_like(confidence)
    lengths, tries, nfes = [length] * batch, [0] * batch, [0] * batch
    commits: list[dict[int, int]] = [{} for _ in range(batch)]
    model_calls = cache_calls = 0
    pending = list(range(batch))
    for attempt in range(settings.max_tries):
        rows = [prompts[i] for i in pending]
        result, stops = _draw(
            model, rows, [sample_ids[i] for i in pending], settings, seed, attempt, on_call, eos_id, vocab_size
        )
        model_calls += result.model_calls
        cache_calls += result.cache_calls
        index = torch.tensor(pending, device=tokens.device)
        tokens[index] = result.tokens
        confidence[index], entropy[index], margin[index] = result.confidence, result.entropy, result.margin
        for row, i in enumerate(pending):
            lengths[i], tries[i], nfes[i] = stops.lengths[row], attempt + 1, int(result.nfes[row])
            commits[i] = result.commits[row]
        pending = [i for row, i in enumerate(pending) if stops.rejected[row]]
        if not pending:
            break
    if pending and settings.var_length:
        raise SamplingError(
            f"sample {sample_ids[pending[0]]} stopped (at a generated EOS or below {settings.reject_entropy} nats of "
            f"entropy) in all {settings.max_tries} tries; at block size 1 BD3-LM's variable-length sampler redraws "
            "every stopped sample and fails here too: use a block size above 1 or raise --max-tries"
        )
    if pending:
        raise SamplingError(
            f"sample {sample_ids[pending[0]]} fell below {settings.reject_entropy} nats of entropy in all "
            f"{settings.max_tries} tries (BD3-LM fails here too); raise --max-tries or lower --reject-entropy"
        )
    return DraftResult(
        tokens=tokens,
        confidence=confidence,
        entropy=entropy,
        margin=margin,
        prompt_lengths=[len(p) for p in prompts],
        lengths=lengths,
        tries=tries,
        nfes=nfes,
        model_calls=model_calls,
        cache_calls=cache_calls,
        seconds=time.perf_counter() - start,
        commits=commits,
    )


def _draw(
    model: BD3LM,
    prompts: list[list[int]],
    sample_ids: list[int],
    settings: DraftSettings,
    seed: int,
    attempt: int,
    on_call: CallCallback | None,
    eos_id: int | None,
    vocab_size: int | None,
) -> tuple[DenoiseResult, _StopConditions]:
    """One draw of every sample in `prompts` from its (seed, id, attempt) stream, with the stop conditions applied."""
    length, device = settings.length, model.device
    tokens = torch.full((len(prompts), length), model.mask_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    prompt_lengths = [len(p) for p in prompts]
    is_masked = torch.arange(length, device=device)[None, :] >= torch.tensor(prompt_lengths, device=device)[:, None]
    confidence = torch.where(is_masked, 0.0, 1.0).float()
    # Stays on the CPU, where positions are scheduled.
    uniforms = draw_uniforms(seed, sample_ids, 0, length, 2, attempt=attempt)
    stops = _StopConditions(prompt_lengths, settings, eos_id)
    result = denoise(
        model,
        tokens,
        is_masked,
        uniforms,
        confidence,
        block_size=settings.block_size,
        settings=settings.unmasking,
        kv_cache=settings.kv_cache,
        on_call=on_call,
        on_block_end=stops if stops.active else None,
        vocab_size=vocab_size,
    )
    stops.finish()
    return result, stops


class _StopConditions:
    """BD3-LM's per-block stop checks for one draw, kept per row so that no sample depends on its neighbours.

    Upstream checks after every block once the sequence so far is longer than the window (`x_accum.shape[1] > 256`,
    diffusion.py 1045), so a block ending at or before the window is never checked, for EOS neither. A row is checked
    at a block end `end` only if the block holds generated tokens (end > its prompt length). Rejection flags stay on
    the device until the draw ends, so plain drafting never waits on the device; only variable-length sampling,
    which must stop rows as it goes, reads them back after each block.
    """

    def __init__(self, prompt_lengths: list[int], settings: DraftSettings, eos_id: int | None) -> None:
        self.settings, self.eos_id = settings, eos_id
        self.prompt_lengths = torch.tensor(prompt_lengths)
        self.lengths = [settings.length] * len(prompt_lengths)
        self.rejected = [False] * len(prompt_lengths)
        self.stopped = torch.zeros(len(prompt_lengths), dtype=torch.bool)
        self.window = settings.entropy_window
        self.entropy_on = settings.reject_entropy > 0 and settings.length > self.window
        self.active = (settings.var_length and settings.length > self.window) or self.entropy_on
        self._low: torch.Tensor | None = None  # [B] bool on the device: rows that failed a check

    def __call__(self, end: int, tokens: torch.Tensor) -> torch.Tensor | None:
        if end <= self.window:
            return None
        checked = (end > self.prompt_lengths) & ~self.stopped  # B (CPU)
        low = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        if self.entropy_on:
            low = window_entropy(tokens, end, self.window) < self.settings.reject_entropy
            low &= checked.to(tokens.device)
        if not self.settings.var_length:
            self._low = low if self._low is None else self._low | low
            return None
        return self._stop_variable_length(end, tokens, checked, low.cpu())

    def _stop_variable_length(
        self, end: int, tokens: torch.Tensor, checked: torch.Tensor, low: torch.Tensor
    ) -> torch.Tensor:
        is_eos = (tokens[:, :end] == self.eos_id).cpu()
        is_eos &= torch.arange(end)[None, :] >= self.prompt_lengths[:, None]  # generated EOS only
        has_eos = is_eos.any(dim=1)
        stop = checked & (has_eos | low)
        for row in stop.nonzero().flatten().tolist():
            if self.settings.block_size == 1:
                # Upstream returns None (a redraw) on `stop and x.shape[-1] == 1`, where x is the last block (1047).
                self.rejected[row] = True
                continue
            # Upstream truncates after the first generated EOS; low entropy overrides it with end - window (1079-1090).
            cut = int(is_eos[row].int().argmax()) + 1 if has_eos[row] else end
            if low[row]:
                cut = end - self.window
            self.lengths[row] = max(cut, int(self.prompt_lengths[row]))
        self.stopped |= stop
        return stop

    def finish(self) -> None:
        """Read the rejection flags back once the draw is over."""
        if self._low is not None:
            self.rejected = self._low.cpu().tolist()
