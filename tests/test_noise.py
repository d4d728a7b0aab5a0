import pytest
import torch

from did_cli.errors import UsageError
from did_cli.noise import clip_for, mask_tokens, parse_clip, parse_mix, sample_t


def test_parse_mix_normalises_and_maps_large_sizes_to_one_global_block():
    mix = parse_mix("4:0.9,1024:0.1", 128)
    assert mix.sizes == (4, 128)
    assert mix.weights == pytest.approx((0.9, 0.1))
    assert parse_mix("16:1", 1024).sizes == (16,)
    merged = parse_mix("256:1,1024:3,8:4", 256)
    assert merged.sizes == (8, 256) and merged.weights == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("3:1", "does not divide"),
        ("4:0", "positive number"),
        ("4:-1", "positive number"),
        ("x:1", "SIZE:WEIGHT"),
        ("", "empty"),
        ("0:1", "positive"),
        ("4:nan", "positive number"),
    ],
)
def test_parse_mix_errors_are_one_line(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_mix(spec, 128)


def test_mix_draws_follow_the_weights_and_the_generator():
    mix = parse_mix("4:0.9,128:0.1", 128)
    draws = [mix.draw(torch.Generator().manual_seed(i)) for i in range(4000)]
    assert abs(draws.count(128) / 4000 - 0.1) < 0.02
    assert mix.draw(torch.Generator().manual_seed(7)) == mix.draw(torch.Generator().manual_seed(7))


def test_parse_clip():
    assert parse_clip("0.5,1") == (0.5, 1.0)
    for bad in ("1", "0.6,0.5", "0,1", "a,b", "x=0.5,1", "4=0.5"):
        with pytest.raises(UsageError):
            parse_clip(bad)


def test_per_block_size_clip_leaves_other_sizes_on_the_full_interval():
    clip = parse_clip("4=0.5,1; 1024=0.3,0.8")
    assert clip == {4: (0.5, 1.0), 1024: (0.3, 0.8)}
    assert clip_for(clip, 4, 128) == (0.5, 1.0)
    assert clip_for(clip, 128, 128) == (0.3, 0.8)  # 1024 >= L is the global block, as in the mix
    assert clip_for(clip, 16, 128) == (1e-3, 1.0)
    assert clip_for((0.2, 0.9), 16, 128) == (0.2, 0.9)


def test_sample_t_is_stratified_over_batch_and_blocks():
    t = sample_t(4, 8, torch.Generator().manual_seed(0), 0.0 + 1e-9, 1.0)
    cells = torch.sort(t.flatten()).values
    strata = torch.arange(32) / 32
    assert ((cells >= strata - 1e-6) & (cells < strata + 1 / 32 + 1e-6)).all()


def test_sample_t_respects_the_clip_interval():
    t = sample_t(16, 4, torch.Generator().manual_seed(0), 0.5, 0.8)
    assert t.min() >= 0.5 and t.max() <= 0.8


def test_mask_tokens_masks_at_rate_t_per_block():
    clean = torch.zeros(200, 64, dtype=torch.long)
    t = torch.tensor([[0.1, 0.9]]).repeat(200, 1)
    noisy, t_token = mask_tokens(clean, t, 32, 5, torch.Generator().manual_seed(0))
    rate = (noisy == 5).float().mean(0)
    assert abs(rate[:32].mean() - 0.1) < 0.02 and abs(rate[32:].mean() - 0.9) < 0.02
    assert torch.equal(t_token[0, :32], torch.full((32,), 0.1))


def test_resample_keeps_masked_fractions_inside_the_clip():
    clean = torch.zeros(64, 16, dtype=torch.long)
    t = torch.full((64, 4), 0.6)
    noisy, _ = mask_tokens(clean, t, 4, 9, torch.Generator().manual_seed(1), resample=True, eps_min=0.5, eps_max=0.8)
    fraction = (noisy == 9).float().view(64, 4, 4).mean(-1)
    assert (fraction >= 0.5).all() and (fraction <= 0.8).all()
