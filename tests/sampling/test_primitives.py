import pytest
import torch

from did_cli.sampling.primitives import draw_uniforms, sample_from_logits, sample_seed


def test_sample_seed_separates_ids_seeds_and_stages():
    seeds = {sample_seed(s, i, k) for s in range(3) for i in range(50) for k in range(3)}
    assert len(seeds) == 450
    assert sample_seed(1, 2, 0) == sample_seed(1, 2, 0)


def test_uniforms_of_a_sample_do_not_depend_on_the_batch():
    together = draw_uniforms(0, [4, 7, 9], 1, 10, 2, torch.device("cpu"))
    alone = draw_uniforms(0, [7], 1, 10, 2, torch.device("cpu"))
    assert torch.equal(together[1], alone[0])
    assert together.dtype == torch.float64


def test_nucleus_keeps_tokens_while_cumulative_mass_is_within_top_p():
    # probs 0.5, 0.3, 0.15, 0.05: cumsum 0.5, 0.8, 0.95, 1.0 -> top_p 0.9 keeps the first two (BD3-LM's rule)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3, 0.0]])
    logits = probs.clamp_min(1e-30).log()
    seen = set()
    for u in torch.linspace(0, 0.999, 200, dtype=torch.float64):
        token, _ = sample_from_logits(logits, u[None], mask_id=4, top_p=0.9)
        seen.add(int(token))
    assert seen == {1, 3}


def test_top_one_is_always_kept():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    token, conf = sample_from_logits(logits, torch.tensor([0.99], dtype=torch.float64), mask_id=3, top_p=0.01)
    assert int(token) == 0
    assert abs(float(conf) - torch.softmax(torch.tensor([5.0, 0.0, 0.0]), 0)[0].item()) < 1e-6


def test_mask_token_is_never_drawn_and_confidence_is_the_raw_probability():
    logits = torch.tensor([[0.0, 1.0, 20.0]])  # the mask (id 2) would dominate if it were not removed
    tokens, conf = sample_from_logits(logits.repeat(100, 1), torch.rand(100, dtype=torch.float64), mask_id=2)
    assert (tokens != 2).all()
    raw = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    for t, c in zip(tokens, conf, strict=True):
        assert abs(float(c) - float(raw[t])) < 1e-6


def test_confidence_is_recorded_before_nucleus_renormalisation():
    probs = torch.tensor([[0.6, 0.3, 0.1, 0.0]])
    tokens, conf = sample_from_logits(
        probs.clamp_min(1e-30).log(), torch.tensor([0.0], dtype=torch.float64), mask_id=3, top_p=0.7
    )
    assert int(tokens) == 0 and abs(float(conf) - 0.6) < 1e-6  # renormalised it would read 1.0


def test_inverse_cdf_sampling_matches_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    n = 40000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens, _ = sample_from_logits(probs.clamp_min(1e-30).log().repeat(n, 1), u, mask_id=4)
    freq = torch.bincount(tokens, minlength=5).double() / n
    torch.testing.assert_close(freq[:4], probs[:4].double(), atol=0.01, rtol=0)


def test_temperature_sharpens_sampling_but_not_recorded_confidence():
    logits = torch.tensor([[2.0, 1.0, 0.0, -9.0]]).repeat(2000, 1)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cold, conf = sample_from_logits(logits, u, mask_id=3, temperature=0.1)
    assert (cold == 0).float().mean() > 0.99
    raw0 = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)[0]
    assert abs(float(conf[cold == 0][0]) - float(raw0)) < 1e-6


def test_top_k_shortcut_gives_the_same_draws_as_a_full_sort(monkeypatch):
    import did_cli.sampling.primitives as primitives

    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 3.0, 8.0):  # flat (full-sort fallback) to peaked (nucleus inside the top k)
        logits = torch.randn(64, 3000, generator=g) * scale
        u = torch.rand(64, generator=g, dtype=torch.float64)
        fast = sample_from_logits(logits, u, mask_id=2999, top_p=0.9)
        with monkeypatch.context() as patch:
            patch.setattr(primitives, "_descending", lambda p, top_p: torch.sort(p, dim=-1, descending=True))
            slow = sample_from_logits(logits, u, mask_id=2999, top_p=0.9)
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_padded_vocabulary_rows_are_never_drawn():
    logits = torch.zeros(64, 12)
    logits[:, 8:11] = 20.0  # padding rows the model (wrongly) favours
    uniforms = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tokens, confidence = sample_from_logits(logits, uniforms, mask_id=11, top_p=1.0, vocab_size=8)
    assert int(tokens.max()) < 8
    torch.testing.assert_close(confidence, torch.full((64,), 1 / 8), atol=1e-6, rtol=0)


def test_did_drafts_only_tokenizer_ids_and_refines_its_own_drafts_with_a_padded_embedding(char_tokenizer, tmp_path):
    from typer.testing import CliRunner

    from did_cli.checkpoints import save_model
    from did_cli.cli import app
    from tests.conftest import make_tiny_model

    model = make_tiny_model(vocab_size=128, mask_id=68, dropout=0.0)  # 68 tokenizer ids, [MASK], 59 padding rows
    with torch.no_grad():
        model.backbone.output_layer.linear.bias[69:] = 50.0
    save_model(model, tmp_path / "padded", char_tokenizer)
    runner = CliRunner()
    drafts = runner.invoke(
        app, ["draft", "-m", str(tmp_path / "padded"), "-n", "2", "--out", str(tmp_path / "d.jsonl")]
    )
    assert drafts.exit_code == 0, drafts.stderr
    for line in (tmp_path / "d.jsonl").read_text().splitlines():
        import json

        assert max(json.loads(line)["tokens"]) < 68
    refined = runner.invoke(app, ["refine", str(tmp_path / "d.jsonl")])
    assert refined.exit_code == 0, refined.stderr


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-30])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_tiny_temperature_is_greedy_and_never_draws_mask(temperature, top_p):
    """logits / T used to overflow to inf - inf = NaN, and the draw fell on the last slot: [MASK]."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 9.0], [0.5, -1.0, 0.25, 9.0]])  # [MASK] = 3 holds the largest logit
    uniforms = torch.tensor([0.999, 0.001], dtype=torch.float64)
    tokens, confidence = sample_from_logits(logits, uniforms, mask_id=3, top_p=top_p, temperature=temperature)
    assert tokens.tolist() == [1, 0]  # the argmax among the real tokens
    assert torch.isfinite(confidence).all()


def test_non_finite_logits_never_draw_a_zero_probability_slot():
    logits = torch.tensor([[float("nan"), 1.0, 2.0, 0.0]])
    tokens, _ = sample_from_logits(logits, torch.tensor([0.5], dtype=torch.float64), mask_id=3)
    assert tokens.tolist() != [3]
