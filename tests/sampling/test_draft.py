import pytest
import torch

from did_cli.errors import UsageError
from did_cli.sampling.draft import draft
from did_cli.settings import DraftSettings, UnmaskingSettings
from tests.conftest import make_tiny_model

BOS = 67


def _draft(model, ids, prompts=None, **kw):
    unmasking = UnmaskingSettings(**{k: kw.pop(k) for k in list(kw) if k in UnmaskingSettings.__dataclass_fields__})
    settings = DraftSettings(length=kw.pop("length", 32), unmasking=unmasking, **kw)
    prompts = prompts or [[BOS] for _ in ids]
    return draft(model, prompts, ids, settings, seed=7)


@pytest.mark.parametrize(
    "options",
    [
        dict(block_size=4),
        dict(block_size=8, order="steps", steps_per_block=3),
        dict(block_size=4, order="confidence"),
        dict(block_size=4, tokens_per_call=2),
        dict(block_size=2, top_p=1.0, temperature=0.7),
    ],
)
def test_cached_drafting_equals_uncached_token_for_token(tiny_model, options):
    cached = _draft(tiny_model, [0, 1, 2], kv_cache=True, **options)
    uncached = _draft(tiny_model, [0, 1, 2], kv_cache=False, **options)
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.confidence, uncached.confidence, atol=1e-5, rtol=1e-5)
    assert cached.nfes == uncached.nfes
    assert uncached.cache_calls == 0


def test_batch_of_one_and_batch_of_four_give_identical_samples(tiny_model):
    together = _draft(tiny_model, [0, 1, 2, 3])
    for i in range(4):
        alone = _draft(tiny_model, [i])
        assert torch.equal(alone.tokens[0], together.tokens[i])
        torch.testing.assert_close(alone.confidence[0], together.confidence[i], atol=1e-5, rtol=1e-5)


def test_sample_does_not_depend_on_its_batch_neighbours(tiny_model):
    first = _draft(tiny_model, [5, 9])
    second = _draft(tiny_model, [9, 5, 11])
    assert torch.equal(first.tokens[0], second.tokens[1])
    assert torch.equal(first.tokens[1], second.tokens[0])


def test_different_ids_and_seeds_give_different_samples(tiny_model):
    out = _draft(tiny_model, [0, 1])
    assert not torch.equal(out.tokens[0], out.tokens[1])


def test_first_hitting_uses_one_call_per_generated_token(tiny_model):
    out = _draft(tiny_model, [0, 1], block_size=4)
    assert out.nfes == [31, 31]  # BOS is given, 31 tokens to draft: BD3-LM's L - 1
    assert out.model_calls == 31
    assert out.cache_calls == 0  # each finished block rides along with the next block's first call


def test_tokens_per_call_divides_the_number_of_calls(tiny_model):
    out = _draft(tiny_model, [0], block_size=4, tokens_per_call=4)
    assert out.nfes == [8]  # block 0 has 3 masked tokens, then 7 blocks of 4


def test_draft_has_no_mask_left_and_confidence_in_range(tiny_model):
    out = _draft(tiny_model, [0, 1, 2], block_size=8, order="steps", steps_per_block=2)
    assert not (out.tokens == tiny_model.mask_id).any()
    generated = out.confidence[:, 1:]
    assert ((generated > 0) & (generated <= 1)).all()
    assert (out.confidence[:, 0] == 1.0).all()
    assert out.confidence.dtype == torch.float32


def test_prompts_are_kept_and_may_differ_in_length(tiny_model):
    prompts = [[BOS, 5, 6, 7, 8, 9], [BOS, 1]]
    out = _draft(tiny_model, [0, 1], prompts=prompts, block_size=4)
    assert out.tokens[0, :6].tolist() == prompts[0]
    assert out.tokens[1, :2].tolist() == prompts[1]
    assert out.prompt_lengths == [6, 2]
    alone = _draft(tiny_model, [0], prompts=prompts[:1], block_size=4)
    assert torch.equal(alone.tokens[0], out.tokens[0])
    uncached = _draft(tiny_model, [0, 1], prompts=prompts, block_size=4, kv_cache=False)
    assert torch.equal(uncached.tokens, out.tokens)


def test_one_global_block_is_mdlm_style_drafting(tiny_model):
    cached = _draft(tiny_model, [0], block_size=32)
    big = _draft(tiny_model, [0], block_size=1024)
    assert torch.equal(cached.tokens, big.tokens)
    assert cached.cache_calls == 0


def test_bad_settings_are_usage_errors(tiny_model):
    with pytest.raises(UsageError, match="does not divide"):
        DraftSettings(length=30, block_size=4)
    with pytest.raises(UsageError, match="exceeds the model's length"):
        _draft(tiny_model, [0], length=64)
    with pytest.raises(UsageError, match="leaves nothing"):
        _draft(tiny_model, [0], prompts=[[BOS] * 32])


def test_nfes_with_fixed_steps_skip_empty_steps():
    model = make_tiny_model()
    out = _draft(model, [0], block_size=4, order="steps", steps_per_block=1000)
    assert out.nfes[0] == 31  # with many steps each call reveals one token; empty steps make no call


def test_a_long_prompt_is_prefilled_in_one_cache_call(tiny_model):
    prompt = [[BOS, *range(1, 14)]]  # 14 tokens: blocks 0-2 are clean, block 3 is half prompt
    out = _draft(tiny_model, [0], prompts=prompt, block_size=4)
    assert out.cache_calls == 1  # blocks 0-1 in one call; block 2 rides along with block 3's first call
    uncached = _draft(tiny_model, [0], prompts=prompt, block_size=4, kv_cache=False)
    assert torch.equal(out.tokens, uncached.tokens)
