"""Editing: committed tokens replaced in place where the model disagrees above a threshold, nothing remasked."""

import math

import pytest
import torch

from did_cli.sampling.draft import draft
from did_cli.sampling.edit import edit
from did_cli.settings import DraftSettings, EditSettings, UnmaskingSettings
from tests.conftest import make_tiny_model

BOS = 67


@pytest.fixture(scope="module")
def drafted():
    model = make_tiny_model()
    out = draft(model, [[BOS]] * 3 + [[BOS, 3, 4, 5, 6]], [0, 1, 2, 3], DraftSettings(length=32), seed=2)
    return model, out


def _edit(model, out, rows=(0, 1, 2, 3), **settings):
    rows = list(rows)
    return edit(
        model,
        out.tokens[rows],
        out.confidence[rows],
        [out.prompt_lengths[i] for i in rows],
        rows,
        1,
        EditSettings(**settings),
        seed=2,
        entropy=out.entropy[rows],
        margin=out.margin[rows],
    )


def test_a_threshold_of_one_changes_nothing(drafted):
    model, out = drafted
    got = _edit(model, out, threshold=1.0, passes=2)
    assert torch.equal(got.tokens, out.tokens) and torch.equal(got.confidence, out.confidence)
    assert not got.edited.any() and got.nfes == [2] * 4


def _argmax_rule(model, tokens, prompt_length, threshold):
    """One pass, written from the rule: the argmax of the SUBS distribution replaces a generated token that differs
    from it when its probability exceeds the threshold."""
    with torch.inference_mode():
        logits = model(tokens[None], block_size=tokens.shape[0])[0].double()
    logits = logits.clone()
    logits[:, model.mask_id] = -math.inf
    probs = torch.softmax(logits, dim=-1)
    best = probs.argmax(dim=-1)
    change = (best != tokens) & (probs.max(dim=-1).values > threshold)
    change[:prompt_length] = False
    return torch.where(change, best, tokens), change


@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_one_argmax_pass_replaces_exactly_what_the_rule_replaces(drafted, threshold):
    model, out = drafted
    got = _edit(model, out, threshold=threshold)
    assert got.edited.any()
    for row in range(4):
        tokens, change = _argmax_rule(model, out.tokens[row], out.prompt_lengths[row], threshold)
        assert torch.equal(got.tokens[row], tokens) and torch.equal(got.edited[row], change)


def test_only_generated_unpinned_positions_change_and_edits_carry_their_measures(drafted):
    model, out = drafted
    pinned = torch.zeros_like(out.tokens, dtype=torch.bool)
    pinned[:, 20] = True
    got = edit(
        model, out.tokens, out.confidence, out.prompt_lengths, [0, 1, 2, 3], 1, EditSettings(threshold=0.0), 2,
        pinned=pinned,
    )  # fmt: skip
    assert not got.edited[:, 20].any() and not got.edited[3, :5].any() and not got.edited[:, 0].any()
    changed = got.tokens != out.tokens
    assert torch.equal(changed, got.edited)  # one pass: replaced means changed
    assert (got.confidence[changed] > 0).all() and torch.equal(got.confidence[~changed], out.confidence[~changed])


@pytest.mark.parametrize("candidate", ["argmax", "sampled"])
def test_edits_do_not_depend_on_the_batch(drafted, candidate):
    model, out = drafted
    settings = dict(threshold=0.02, passes=2, candidate=candidate, unmasking=UnmaskingSettings(top_p=0.9))
    whole = _edit(model, out, **settings)
    for row in range(4):
        alone = _edit(model, out, rows=[row], **settings)
        assert torch.equal(alone.tokens[0], whole.tokens[row]) and torch.equal(alone.edited[0], whole.edited[row])
        assert torch.equal(alone.confidence[0], whole.confidence[row])
