import torch
import torch.nn.functional as F

from did_cli.training.objective import nelbo_sum
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
