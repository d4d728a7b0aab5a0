import pytest
import torch
import torch.nn.functional as F

from did_cli.noise import is_unweighted
from did_cli.training.objective import nelbo_sum, nelbo_terms, noise_batch, validation_nelbo
from tests.conftest import make_tiny_model


def test_nelbo_equals_a_naive_per_block_computation():
    model = make_tiny_model(dropout=0.0)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 68, (2, 32), generator=g)
    t = torch.rand(2, 8, generator=g) * 0.9 + 0.1
    t_token = t.repeat_interleave(4, dim=1)
    is_masked = torch.rand(2, 32, generator=g) < t_token
    noisy = torch.where(is_masked, torch.full_like(clean, model.mask_id), clean)
    with torch.no_grad():
        ours = nelbo_sum(model, clean, noisy, t_token, 4)
        expected = torch.zeros(())
        for start in range(0, 32, 4):
            context = torch.cat([clean[:, :start], noisy[:, start : start + 4]], dim=1)
            logits = model(context, block_size=4)[:, start:].clone()
            logits[..., model.mask_id] = float("-inf")
            logp = F.log_softmax(logits, dim=-1).gather(-1, clean[:, start : start + 4, None]).squeeze(-1)
            block_masked = is_masked[:, start : start + 4]
            expected += (-logp / t_token[:, start : start + 4])[block_masked].sum()
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)


def test_unmasked_positions_contribute_nothing_and_gradients_flow():
    model = make_tiny_model(dropout=0.0).train()
    clean = torch.randint(0, 68, (2, 32), generator=torch.Generator().manual_seed(1))
    noisy = clean.clone()
    noisy[:, 5] = model.mask_id
    t = torch.full((2, 32), 0.5)
    loss = nelbo_sum(model, clean, noisy, t, 8)
    loss.backward()
    assert loss > 0
    assert model.backbone.output_layer.linear.weight.grad.abs().sum() > 0
    nothing = nelbo_sum(model, clean, clean, t, 8)
    assert float(nothing.detach()) == 0.0


def test_noise_batch_never_masks_position_0_even_when_every_block_is_masked():
    clean = torch.randint(0, 68, (16, 32), generator=torch.Generator().manual_seed(2))
    for block_size in (1, 4, 32):
        noisy, t = noise_batch(clean, block_size, 68, torch.Generator().manual_seed(3), (0.999, 1.0))
        assert (noisy[:, 0] == clean[:, 0]).all()
        assert (noisy[:, 1:] == 68).float().mean() > 0.99
        assert t.shape == clean.shape


def test_validation_nelbo_keeps_bos_clean_and_divides_by_l_minus_1():
    model = make_tiny_model(dropout=0.0)
    clean = torch.randint(0, 68, (3, 32), generator=torch.Generator().manual_seed(4))
    ours = validation_nelbo(model, clean, 8, torch.Generator().manual_seed(5))
    # The same generator stream, drawn here by hand: t per block, stratified over 3 x 4 cells, in [1e-3, 1].
    g = torch.Generator().manual_seed(5)
    cells = 3 * 4
    u = torch.rand(3, 4, generator=g)
    t = ((u / cells + torch.arange(cells).view(3, 4) / cells) % 1.0) * (1 - 1e-3) + 1e-3
    t_token = t.repeat_interleave(8, dim=1)
    is_masked = torch.rand(3, 32, generator=g) < t_token
    is_masked[:, 0] = False
    noisy = torch.where(is_masked, torch.full_like(clean, model.mask_id), clean)
    total = 0.0
    with torch.no_grad():
        for start in range(0, 32, 8):
            context = torch.cat([clean[:, :start], noisy[:, start : start + 8]], dim=1)
            logits = model(context, block_size=8)[:, start:].clone()
            logits[..., model.mask_id] = float("-inf")
            logp = F.log_softmax(logits, dim=-1).gather(-1, clean[:, start : start + 8, None]).squeeze(-1)
            total += float((-logp / t_token[:, start : start + 8])[is_masked[:, start : start + 8]].sum())
    assert ours == pytest.approx(total / (3 * 31), rel=1e-5)


def test_unweighted_loss_above_half_the_clip():
    assert not is_unweighted(0.5) and is_unweighted(0.51)
    model = make_tiny_model(dropout=0.0)
    clean = torch.randint(0, 68, (2, 32), generator=torch.Generator().manual_seed(6))
    noisy = clean.clone()
    noisy[:, 3:9] = model.mask_id
    t = torch.full((2, 32), 0.6)
    with torch.no_grad():
        weighted = nelbo_sum(model, clean, noisy, t, 4)
        unweighted = nelbo_sum(model, clean, noisy, t, 4, weighted=False)
    torch.testing.assert_close(unweighted, weighted * 0.6, rtol=1e-5, atol=1e-6)


def test_nelbo_terms_skip_positions_outside_scored():
    model = make_tiny_model(dropout=0.0)
    clean = torch.randint(0, 68, (2, 32), generator=torch.Generator().manual_seed(7))
    clean[:, 20:] = model.mask_id  # padding that holds the mask id, as BD3-LM pads GPT-2 rows
    noisy = clean.clone()
    noisy[:, 2:24] = model.mask_id
    scored = torch.zeros(2, 32, dtype=torch.bool)
    scored[:, :20] = True
    with torch.no_grad():
        terms = nelbo_terms(model, clean, noisy, torch.full((2, 32), 0.5), 4, scored=scored)
    assert torch.isfinite(terms).all()
    assert (terms[:, 20:] == 0).all() and (terms[:, :2] == 0).all() and (terms[:, 2:20] > 0).all()
