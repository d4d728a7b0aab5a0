"""`--kv-cache-dtype`: a bf16 KV cache under fp32 weights runs BD3-LM's CUDA sampler numerics (q/k/v rounded to bf16
before rotary, rotary in bf16, attention in fp32); a float32 cache changes nothing. The oracle is the literal
reference in tests/bd3lm_reference.py run on the whole prefix + block, re-rotating the rounded projections at every
call as BD3-LM does."""

import pytest
import torch

from did_cli.checkpoints import load_model
from did_cli.errors import UsageError
from did_cli.execution import StaticDecoder
from did_cli.kv_cache import check_kv_cache_dtype
from did_cli.sampling.draft import draft
from did_cli.settings import DraftSettings
from tests.bd3lm_reference import naive_block_causal, reference_logits
from tests.conftest import make_tiny_model

ATOL = 1e-5
BOS = 67


def _clean_and_noisy(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 68, (3, 32), generator=generator)
    noisy = torch.where(torch.rand(clean.shape, generator=generator) > 0.6, clean, torch.full_like(clean, 68))
    return clean, noisy


def _cached_and_direct(model, cache_dtype, block_size):
    """Per block: (cached logits, direct logits with bf16-rounded qkv, direct fp32 logits), each [3, B, V]."""
    clean, noisy = _clean_and_noisy()
    cache = model.new_cache(3, dtype=cache_dtype)
    state = model.state_dict()
    out = []
    with torch.no_grad():
        for start in range(0, 32, block_size):
            end = start + block_size
            cached = model(noisy[:, start:end], block_size, cache=cache)
            sequence = torch.cat([clean[:, :start], noisy[:, start:end]], dim=1)
            mask = naive_block_causal(end, block_size)
            rounded = reference_logits(state, 4, sequence, torch.arange(end), mask, qkv_dtype=torch.bfloat16)
            exact = reference_logits(state, 4, sequence, torch.arange(end), mask)
            out.append((cached, rounded[:, start:end], exact[:, start:end]))
            model.extend_cache(clean[:, start:end], cache, block_size)
    return out


@pytest.mark.parametrize("block_size", [1, 4, 8, 16])
def test_bf16_cache_logits_equal_a_direct_computation_with_bf16_qkv_and_fp32_attention(block_size):
    # One layer: the rounded projections are bitwise those of the direct computation, so only fp32 summation order
    # differs (measured <= 2.2e-6); the rounding itself moves logits by ~1.6e-3 on average.
    blocks = _cached_and_direct(make_tiny_model(n_blocks=1), torch.bfloat16, block_size)
    for cached, rounded, _ in blocks:
        assert cached.dtype == torch.float32
        torch.testing.assert_close(cached, rounded, atol=ATOL, rtol=ATOL)
    assert min((rounded - exact).abs().mean().item() for _, rounded, exact in blocks) > 10 * ATOL


@pytest.mark.parametrize(("layers", "block_size"), [(2, 4), (2, 8), (4, 16)])
def test_bf16_cache_tracks_the_direct_computation_through_several_layers(layers, block_size):
    # With more layers, a one-ulp fp32 difference in one layer can move a bf16 rounding in the next (measured: at
    # most 2.3e-3 in one logit), so the check is on the mean: within 1/20 of how far the rounding moves the logits
    # from fp32 (measured ratios 1/70 to 1/5000).
    blocks = _cached_and_direct(make_tiny_model(n_blocks=layers), torch.bfloat16, block_size)
    cached, rounded, exact = (torch.cat(parts, dim=1) for parts in zip(*blocks, strict=True))
    assert (cached - rounded).abs().mean() < (rounded - exact).abs().mean() / 20


def test_float32_cache_dtype_is_the_exact_fp32_path():
    for cached, _, exact in _cached_and_direct(make_tiny_model(), torch.float32, 4):
        torch.testing.assert_close(cached, exact, atol=ATOL, rtol=ATOL)


def test_float32_cache_dtype_keeps_cached_drafts_equal_to_uncached_token_for_token():
    model = make_tiny_model()
    model.kv_cache_dtype = torch.float32
    prompts, ids = [[BOS, 3, 4, 5], [BOS]], [0, 1]
    cached = draft(model, prompts, ids, DraftSettings(length=32, block_size=4), seed=3)
    uncached = draft(model, prompts, ids, DraftSettings(length=32, block_size=4, kv_cache=False), seed=3)
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.confidence, uncached.confidence, atol=ATOL, rtol=ATOL)


def test_bf16_cache_promises_exact_repeats_at_a_fixed_batch_size_and_seed():
    # What is promised for a bf16 cache: the same seed and batch size repeat exactly (tokens and confidences).
    # Tokens across batch sizes or against --no-kv-cache are not promised (a one-ulp fp32 difference can move a
    # bf16 rounding); the cache must still act, so the confidences differ from the fp32 cache's.
    model = make_tiny_model()
    settings = DraftSettings(length=32, block_size=4)
    model.kv_cache_dtype = torch.bfloat16
    first = draft(model, [[BOS]] * 4, [0, 1, 2, 3], settings, seed=3)
    second = draft(model, [[BOS]] * 4, [0, 1, 2, 3], settings, seed=3)
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.confidence, second.confidence)
    model.kv_cache_dtype = None
    fp32 = draft(model, [[BOS]] * 4, [0, 1, 2, 3], settings, seed=3)
    assert not torch.equal(first.confidence, fp32.confidence)


def test_static_decoder_cache_runs_the_same_bf16_numerics():
    model = make_tiny_model()
    model.kv_cache_dtype = torch.bfloat16
    tokens = _clean_and_noisy(seed=4)[0][:2]
    plain = model.new_cache(2, 32)
    model.decoder = StaticDecoder(model)  # the static-shape step --compile and --cuda-graphs run, here eagerly
    static = model.new_cache(2, 32)
    assert plain.keys.dtype == static.keys.dtype == torch.bfloat16
    with torch.no_grad():
        for cache in (plain, static):
            model.extend_cache(tokens[:, :8], cache, 4)
        for start in range(8, 32, 4):
            want = model(tokens[:, start : start + 4], 4, cache=plain, commit=4)
            got = model(tokens[:, start : start + 4], 4, cache=static, commit=4)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_cache_dtype_names_and_the_refused_combination():
    assert check_kv_cache_dtype(None, torch.float32) is None
    assert check_kv_cache_dtype("bfloat16", torch.float32) is torch.bfloat16
    assert check_kv_cache_dtype("bfloat16", torch.bfloat16) is torch.bfloat16
    with pytest.raises(UsageError, match="use float32 or bfloat16"):
        check_kv_cache_dtype("float16", torch.float32)
    with pytest.raises(UsageError, match="needs float32 weights"):
        check_kv_cache_dtype("float32", torch.bfloat16)


def test_load_model_sets_the_cache_dtype(tiny_checkpoint):
    model = load_model(str(tiny_checkpoint), device="cpu", kv_cache_dtype="bfloat16")
    assert model.dtype == torch.float32 and model.new_cache(1).keys.dtype == torch.bfloat16
    assert load_model(str(tiny_checkpoint), device="cpu", dtype="bfloat16").new_cache(1).keys.dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_bf16_cache_draft_equals_eager():
    # aot_eager traces the static step as --compile does, without inductor's fusion (which may round the bf16 rotary
    # once instead of per operation; see docs/fidelity.md). About 7 s on a small CPU.
    from did_cli.execution import optimize

    eager = make_tiny_model()
    eager.kv_cache_dtype = torch.bfloat16
    want = draft(eager, [[BOS]] * 2, [0, 1], DraftSettings(length=32), seed=3)
    model = optimize(make_tiny_model(), compile=True, compile_backend="aot_eager")
    model.kv_cache_dtype = torch.bfloat16
    got = draft(model, [[BOS]] * 2, [0, 1], DraftSettings(length=32), seed=3)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.confidence, want.confidence, atol=ATOL, rtol=ATOL)
