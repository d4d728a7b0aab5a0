"""Measures that pick the tokens worth revising: snapshot entropy and margin, MC dropout, the noise ensemble, energy."""

import math

import pytest
import torch

from did_cli.sampling.draft import draft
from did_cli.sampling.refine import refine
from did_cli.sampling.remask import (
    STRATEGIES,
    RemaskInputs,
    ensemble_probs,
    mc_dropout_scores,
    mc_variance_scores,
    noise_ensemble_scores,
    posthoc_scores,
)
from did_cli.settings import DraftSettings, RefineSettings
from tests.conftest import make_tiny_model

BOS = 67


class Spy:
    """The real denoiser, recording the positions and logits of every call (uncached drafting selects exactly the
    positions each call commits)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, block_size=None, select=None, **kwargs):
        logits = self.model(tokens, block_size, select=select, **kwargs)
        self.calls.append((select.clone(), logits.clone()))
        return logits


def _direct(logits: torch.Tensor, mask_id: int) -> tuple[float, float]:
    """Entropy (nats) and top-1 minus top-2 of the SUBS distribution of one logits row, written out."""
    logits = logits.double().clone()
    logits[mask_id] = -math.inf
    probs = torch.softmax(logits, dim=-1).tolist()
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    first, second = sorted(probs, reverse=True)[:2]
    return entropy, first - second


@pytest.mark.parametrize("block_size", [4, 8])
def test_snapshot_entropy_and_margin_are_the_committing_calls_distribution(block_size):
    model = make_tiny_model()
    spy = Spy(model)
    settings = DraftSettings(length=32, block_size=block_size, kv_cache=False, reject_entropy=0.0)
    out = draft(spy, [[BOS]] * 2 + [[BOS, 3, 4, 5]], [0, 1, 2], settings, seed=4)
    checked = 0
    for row in range(3):
        for position in range(out.prompt_lengths[row], 32):
            hits = [(select, logits) for select, logits in spy.calls if position in select[row].tolist()]
            assert len(hits) == 1  # first-hitting: each position is selected once, by the call that commits it
            select, logits = hits[0]
            slot = select[row].tolist().index(position)
            entropy, margin = _direct(logits[row, slot], model.mask_id)
            assert out.entropy[row, position].item() == pytest.approx(entropy, abs=1e-5)
            assert out.margin[row, position].item() == pytest.approx(margin, abs=1e-6)
            checked += 1
    assert checked == 31 + 31 + 28
    assert (out.entropy[:, 0] == 0).all() and (out.margin[:, 0] == 1).all()  # BOS, like its confidence of 1


def _inputs(model, tokens, confidence, ids, passes=3, ratio=0.5, seed=0):
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    eligible[:, 0] = False
    return RemaskInputs(
        tokens=tokens,
        confidence=confidence,
        entropy=None,
        margin=None,
        uniforms=torch.zeros(tokens.shape, dtype=torch.float64),
        model=model,
        block_size=tokens.shape[1],
        sample_ids=ids,
        stage=1,
        seed=seed,
        passes=passes,
        ensemble_ratio=ratio,
        eligible=eligible,
    )


@pytest.fixture(scope="module")
def drafted():
    model = make_tiny_model(dropout=0.3)
    out = draft(model, [[BOS]] * 4, [0, 1, 2, 3], DraftSettings(length=32), seed=1)
    return model, out


def test_mc_dropout_without_dropout_is_post_hoc_confidence_exactly():
    model = make_tiny_model(dropout=0.0)
    out = draft(model, [[BOS]] * 3, [0, 1, 2], DraftSettings(length=32), seed=1)
    inputs = _inputs(model, out.tokens, out.confidence, [0, 1, 2])
    assert torch.equal(mc_dropout_scores(inputs), posthoc_scores(inputs))
    assert torch.equal(mc_variance_scores(inputs), torch.zeros_like(mc_variance_scores(inputs)))


def test_mc_dropout_is_seeded_per_sample_and_independent_of_the_batch(drafted):
    model, out = drafted
    whole = mc_dropout_scores(_inputs(model, out.tokens, out.confidence, [0, 1, 2, 3]))
    assert torch.equal(whole, mc_dropout_scores(_inputs(model, out.tokens, out.confidence, [0, 1, 2, 3])))
    alone = mc_dropout_scores(_inputs(model, out.tokens[2:3], out.confidence[2:3], [2]))
    assert torch.equal(whole[2:3], alone)
    posthoc = posthoc_scores(_inputs(model, out.tokens, out.confidence, [0, 1, 2, 3]))
    assert not torch.equal(whole, posthoc)  # dropout 0.3 moves the probabilities
    other_seed = mc_dropout_scores(_inputs(model, out.tokens, out.confidence, [0, 1, 2, 3], seed=1))
    assert not torch.equal(whole, other_seed)
    assert model.training is False  # the model is left in eval mode


def test_the_noise_ensemble_of_one_fixed_mask_is_the_models_probabilities_on_that_input(drafted):
    model, out = drafted
    tokens = out.tokens[:2]
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 5:20:3] = True
    probs = ensemble_probs(model, tokens, mask[None], block_size=32)[0]
    with torch.inference_mode():
        logits = model(torch.where(mask, model.mask_id, tokens), block_size=32).float()
    logits = logits.clone()  # a normal tensor, writable outside inference mode
    logits[..., model.mask_id] = -math.inf
    direct = torch.softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1).double()
    torch.testing.assert_close(probs[mask], direct[mask], atol=1e-6, rtol=0)
    assert probs[~mask].isnan().all()


def test_the_noise_ensemble_is_seeded_and_independent_of_the_batch(drafted):
    model, out = drafted
    whole = noise_ensemble_scores(_inputs(model, out.tokens, out.confidence, [0, 1, 2, 3], passes=2))
    alone = noise_ensemble_scores(_inputs(model, out.tokens[1:2], out.confidence[1:2], [1], passes=2))
    assert torch.equal(whole[1:2], alone)
    assert torch.isfinite(whole).all()


@pytest.mark.parametrize("remask", sorted(STRATEGIES))
def test_every_strategy_changes_only_remasked_positions_and_counts_its_calls(drafted, remask):
    model, out = drafted
    settings = RefineSettings(gamma=0.25, remask=remask, passes=2)
    got = refine(
        model, out.tokens, out.confidence, [1] * 4, [0, 1, 2, 3], 1, settings, 1, entropy=out.entropy, margin=out.margin
    )
    assert torch.equal(got.tokens[~got.remasked], out.tokens[~got.remasked])
    assert (got.remasked.sum(dim=1) == round(0.25 * 31)).all()
    scoring = {"posthoc": 1, "energy": 1, "mc-dropout": 2, "mc-variance": 2, "noise-ensemble": 2}.get(remask, 0)
    assert got.model_calls >= scoring and min(got.nfes) >= scoring


def test_snapshot_entropy_and_margin_pick_the_least_certain_positions():
    tokens = torch.tensor([[BOS, 1, 2, 3, 4]])
    entropy = torch.tensor([[0.0, 0.1, 2.0, 0.5, 3.0]])
    margin = torch.tensor([[1.0, 0.9, 0.05, 0.4, 0.2]])
    inputs = RemaskInputs(
        tokens=tokens,
        confidence=torch.ones(1, 5),
        entropy=entropy,
        margin=margin,
        uniforms=torch.zeros(1, 5, dtype=torch.float64),
        model=None,
        block_size=5,
        sample_ids=[0],
        stage=1,
        seed=0,
        passes=1,
        ensemble_ratio=0.5,
        eligible=torch.tensor([[False, True, True, True, True]]),
    )
    from did_cli.sampling.remask import select_lowest

    assert select_lowest(STRATEGIES["snapshot-entropy"](inputs), inputs.eligible, 0.5)[0].tolist() == [
        False, False, True, False, True
    ]  # fmt: skip
    assert select_lowest(STRATEGIES["snapshot-margin"](inputs), inputs.eligible, 0.5)[0].tolist() == [
        False, False, True, False, True
    ]  # fmt: skip
