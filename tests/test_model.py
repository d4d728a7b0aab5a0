import pytest
import torch

from did_cli.config import ModelConfig
from did_cli.model import BD3LM
from tests.bd3lm_reference import reference_sample_mode, reference_train_mode
from tests.conftest import make_tiny_model

ATOL = 1e-5


def _tokens(batch, n, vocab=68, seed=1):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _noisy(clean, mask_id, p=0.5, seed=2):
    keep = torch.rand(clean.shape, generator=torch.Generator().manual_seed(seed)) > p
    return torch.where(keep, clean, torch.full_like(clean, mask_id))


@pytest.mark.parametrize("block_size", [1, 4, 8, 32])
def test_sample_mode_logits_match_reference_implementation(tiny_model, block_size):
    tokens = _noisy(_tokens(2, 32), tiny_model.mask_id)
    with torch.no_grad():
        ours = tiny_model(tokens, block_size=block_size)
    expected = reference_sample_mode(tiny_model.state_dict(), 4, tokens, block_size)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("block_size", [2, 4, 8, 16])
def test_train_form_logits_match_reference_implementation(tiny_model, block_size):
    clean = _tokens(2, 32)
    noisy = _noisy(clean, tiny_model.mask_id)
    with torch.no_grad():
        ours = tiny_model.forward_train(noisy, clean, block_size)
    expected = reference_train_mode(tiny_model.state_dict(), 4, noisy, clean, block_size)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_train_form_block_equals_clean_prefix_plus_noisy_block(tiny_model, block_size):
    clean = _tokens(2, 32)
    noisy = _noisy(clean, tiny_model.mask_id)
    with torch.no_grad():
        train_logits = tiny_model.forward_train(noisy, clean, block_size)
        for start in range(0, 32, block_size):
            end = start + block_size
            prefix_plus_block = torch.cat([clean[:, :start], noisy[:, start:end]], dim=1)
            sample_logits = tiny_model(prefix_plus_block, block_size=block_size)[:, start:end]
            torch.testing.assert_close(train_logits[:, start:end], sample_logits, atol=ATOL, rtol=ATOL)


def test_train_form_with_one_block_is_the_bidirectional_denoiser(tiny_model):
    clean = _tokens(2, 32)
    noisy = _noisy(clean, tiny_model.mask_id)
    with torch.no_grad():
        expected = reference_train_mode(tiny_model.state_dict(), 4, noisy, clean, 32)
        torch.testing.assert_close(tiny_model.forward_train(noisy, clean, 32), expected, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(tiny_model.forward_train(noisy, clean, 1024), expected, atol=ATOL, rtol=ATOL)


def test_block_size_at_least_length_equals_full_bidirectional_attention(tiny_model):
    tokens = _noisy(_tokens(2, 32), tiny_model.mask_id)
    all_visible = torch.ones(32, 32, dtype=torch.bool)
    from tests.bd3lm_reference import reference_logits

    expected = reference_logits(tiny_model.state_dict(), 4, tokens, torch.arange(32), all_visible)
    with torch.no_grad():
        for size in (32, 64, None):
            torch.testing.assert_close(tiny_model(tokens, block_size=size), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_cached_decoding_equals_uncached_block_causal_forward(tiny_model, block_size):
    """Append finished blocks one at a time and denoise the next noisy block against the cache."""
    clean = _tokens(3, 32)
    noisy = _noisy(clean, tiny_model.mask_id, p=0.7)
    cache = tiny_model.new_cache(batch_size=3, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, 32, block_size):
            end = start + block_size
            cached = tiny_model(noisy[:, start:end], block_size=block_size, cache=cache)
            uncached = tiny_model(torch.cat([clean[:, :start], noisy[:, start:end]], 1), block_size=block_size)
            torch.testing.assert_close(cached, uncached[:, start:end], atol=ATOL, rtol=ATOL)
            assert cache.length == start
            tiny_model.extend_cache(clean[:, start:end], cache, block_size)
            assert cache.length == end


def test_multi_block_prefill_equals_block_by_block_appends(tiny_model):
    clean = _tokens(2, 32)
    one_go = tiny_model.new_cache(2, dtype=torch.float32)
    stepwise = tiny_model.new_cache(2, dtype=torch.float32)
    with torch.no_grad():
        tiny_model.extend_cache(clean[:, :16], one_go, 4)
        for start in range(0, 16, 4):
            tiny_model.extend_cache(clean[:, start : start + 4], stepwise, 4)
    torch.testing.assert_close(one_go.keys[:, :, :, :16], stepwise.keys[:, :, :, :16], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(one_go.values[:, :, :, :16], stepwise.values[:, :, :, :16], atol=ATOL, rtol=ATOL)


def test_selected_logits_equal_the_rows_of_full_logits(tiny_model):
    tokens = _noisy(_tokens(2, 16), tiny_model.mask_id)
    select = tokens == tiny_model.mask_id
    with torch.no_grad():
        full = tiny_model(tokens, block_size=4)
        picked = tiny_model(tokens, block_size=4, select=select)
    torch.testing.assert_close(picked, full[select], atol=ATOL, rtol=ATOL)


def test_dropout_acts_only_in_training_mode(tiny_model):
    tokens = _tokens(2, 16)
    with torch.no_grad():
        first, second = tiny_model(tokens), tiny_model(tokens)
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        tiny_model.train()
        assert not torch.allclose(tiny_model(tokens), first)


def test_bf16_model_runs_and_stays_close_to_fp32(tiny_model):
    tokens = _noisy(_tokens(2, 32), tiny_model.mask_id)
    with torch.no_grad():
        reference = tiny_model(tokens, block_size=4)
        low = make_tiny_model().to(torch.bfloat16)(tokens, block_size=4)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_small_preset_has_the_bd3lm_parameter_count():
    config = ModelConfig.from_preset("small", vocab_size=50258, model_length=1024)
    with torch.device("meta"):
        model = BD3LM(config)
    params = sum(p.numel() for p in model.parameters())
    assert params == 169_627_218 == config.num_parameters()
    assert len(model.state_dict()) == 133
