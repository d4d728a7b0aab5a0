"""The record contract (`made_with`): records are reused exactly when they were made from these inputs and settings."""

import dataclasses

import pytest

from did_cli import api
from did_cli.checkpoints import load_model, load_tokenizer
from did_cli.provenance import Identity, expect_drafts, expect_refinements, made_with
from did_cli.settings import DraftSettings, RefineSettings, UnmaskingSettings

DRAFT = DraftSettings(length=32, block_size=4)
REFINE = RefineSettings(gamma=0.5)
TIMING = ("seconds", "batch_size", "model_calls", "cache_calls")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    model = load_model(str(tiny_checkpoint))
    return model, load_tokenizer(model)


@pytest.fixture(scope="module")
def drafts(loaded):
    model, tokenizer = loaded
    return list(api.draft(model, tokenizer, DRAFT, num_samples=4, seed=0, batch_size=2))


def _expect(loaded, settings=DRAFT, seed=0, prompts=None, num_samples=4, identity=None, refinements=()):
    model, tokenizer = loaded
    identity = identity or Identity.of(model, tokenizer)
    encoded = api.encode_prompts(tokenizer, prompts)
    return expect_drafts(identity, settings, seed, encoded, num_samples, refinements)


def _with_stage(record, **changes):
    return dataclasses.replace(record, stages=[{**record.stages[0], **changes}, *record.stages[1:]])


def test_records_made_by_the_run_are_made_with_it(loaded, drafts):
    assert made_with(drafts, _expect(loaded)) is None
    assert _expect(loaded).ids == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        (dict(seed=1), "sample 0 was made with seed 0, this run uses 1"),
        (dict(settings=dataclasses.replace(DRAFT, unmasking=UnmaskingSettings(top_p=0.5))), "top_p=0.9, this run uses"),
        (dict(settings=dataclasses.replace(DRAFT, block_size=8)), "draft block_size=4, this run uses 8"),
        (dict(settings=dataclasses.replace(DRAFT, reject_entropy=0.0)), "draft reject_entropy=4.0, this run uses 0.0"),
        (dict(prompts=["ab"]), "sample 0 was made for the prompt None, this run gives it 'ab'"),
        (dict(num_samples=2), "sample 2 is not one of the 2 samples this run makes (ids 0-1)"),
        (dict(refinements=[REFINE]), "sample 0 has 1 stages, this run makes 2"),
    ],
)  # fmt: skip
def test_each_difference_in_inputs_or_settings_is_named(loaded, drafts, expected, message):
    assert message in (made_with(drafts, _expect(loaded, **expected)) or "")


def test_other_weights_and_numerics_are_named(loaded, drafts):
    ours = Identity.of(*loaded)
    other = dataclasses.replace(ours, sha256="f" * 64)
    assert made_with(drafts, _expect(loaded, identity=other)).startswith("sample 0 was made by other weights")
    bf16 = dataclasses.replace(ours, dtype="bfloat16", kv_cache_dtype="bfloat16")
    assert (
        made_with(drafts, _expect(loaded, identity=bf16))
        == "sample 0 was made with dtype float32, this run uses bfloat16"
    )
    vocab = dataclasses.replace(ours, tokenizer={**ours.tokenizer, "vocab_size": 99})
    assert "tokenizer of 68 tokens, this run's has 99" in made_with(drafts, _expect(loaded, identity=vocab))


def test_a_changed_n_that_moves_a_prompt_to_another_id_is_named(loaded):
    model, tokenizer = loaded
    two = list(api.draft(model, tokenizer, DRAFT, num_samples=2, seed=0, prompts=["ab", "cd"], batch_size=4))
    assert made_with(two, _expect(loaded, prompts=["ab", "cd"], num_samples=2)) is None
    # With -n 3, id 2 belongs to the first prompt; the kept sample 2 was drawn for the second.
    assert made_with(two, _expect(loaded, prompts=["ab", "cd"], num_samples=3)) == (
        "sample 2 was made for the prompt 'cd', this run gives it 'ab'"
    )


def test_a_sample_twice_is_named(loaded, drafts):
    assert made_with([drafts[0], drafts[1], drafts[0]], _expect(loaded)) == "sample 0 appears twice"


def test_keys_added_later_take_the_value_older_records_had(loaded, drafts):
    older = [
        dataclasses.replace(d, stages=[{k: v for k, v in d.stages[0].items() if k != "entropy_window"}]) for d in drafts
    ]
    assert made_with(older, _expect(loaded)) is None  # the entropy window was always 256
    before_rejection = [
        dataclasses.replace(d, stages=[{k: v for k, v in d.stages[0].items() if k != "reject_entropy"}]) for d in drafts
    ]
    assert (
        made_with(before_rejection, _expect(loaded))
        == "sample 0 was made with draft reject_entropy=0.0, this run uses 4.0"
    )


def test_refinements_must_come_from_the_given_input_records(loaded, drafts):
    model, tokenizer = loaded
    identity = Identity.of(model, tokenizer)
    refined = list(api.refine(model, tokenizer, drafts, REFINE, seed=0, batch_size=2))
    assert made_with(refined, expect_refinements(identity, REFINE, 0, drafts)) is None
    others = list(api.draft(model, tokenizer, DRAFT, num_samples=4, seed=5, batch_size=2))
    assert made_with(refined, expect_refinements(identity, REFINE, 0, others)) == (
        "sample 0 was refined from another record than the input's sample 0"
    )
    touched = [dataclasses.replace(drafts[0], confidence=[*drafts[0].confidence[:-1], 0.123]), *drafts[1:]]
    assert "other confidences" in made_with(refined, expect_refinements(identity, REFINE, 0, touched))
    retokened = [dataclasses.replace(drafts[0], tokens=[*drafts[0].tokens[:-1], 3], draft_tokens=None), *drafts[1:]]
    assert "from another record" in made_with(refined, expect_refinements(identity, REFINE, 0, retokened))
    assert made_with(refined, expect_refinements(identity, REFINE, 0, drafts[1:])) == (
        "sample 0 is not among this run's input records"
    )
    other_gamma = dataclasses.replace(REFINE, gamma=0.25)
    assert "refine gamma=0.5, this run uses 0.25" in made_with(
        refined, expect_refinements(identity, other_gamma, 0, drafts)
    )
    damaged = [_with_stage(refined[0])] + refined[1:]
    damaged[0].stages[-1] = {**refined[0].stages[-1], "remasked": [999]}
    assert "damaged refine stage" in made_with(damaged, expect_refinements(identity, REFINE, 0, drafts))


def test_generated_records_are_made_with_the_drafting_and_refining_settings(loaded):
    model, tokenizer = loaded
    records = list(api.generate(model, tokenizer, DRAFT, [REFINE], num_samples=3, seed=0, batch_size=2))
    assert made_with(records, _expect(loaded, num_samples=3, refinements=[REFINE])) is None
    other = [dataclasses.replace(REFINE, remask="random")]
    assert "refine remask='snapshot', this run uses 'random'" in made_with(
        records, _expect(loaded, num_samples=3, refinements=other)
    )


def _numbers(records):
    return [
        (r.id, r.tokens, r.confidence, [{k: v for k, v in s.items() if k not in TIMING} for s in r.stages])
        for r in records
    ]


@pytest.mark.parametrize("batch_size", [2, 3])
@pytest.mark.parametrize("kept", [1, 4])
def test_a_resumed_run_equals_an_unbroken_one_bit_for_bit(loaded, batch_size, kept):
    """Skipped samples leave the batch layout as it was: the rest is computed in the very same batches."""
    model, tokenizer = loaded
    whole = list(api.draft(model, tokenizer, DRAFT, num_samples=7, seed=0, batch_size=batch_size))
    rest = list(api.draft(model, tokenizer, DRAFT, num_samples=7, seed=0, batch_size=batch_size, skip_ids=range(kept)))
    assert _numbers(whole[:kept] + rest) == _numbers(whole)
    refined = list(api.refine(model, tokenizer, whole, REFINE, seed=0, batch_size=batch_size))
    more = list(api.refine(model, tokenizer, whole, REFINE, seed=0, batch_size=batch_size, skip_ids=range(kept)))
    assert _numbers(refined[:kept] + more) == _numbers(refined)
    generated = list(api.generate(model, tokenizer, DRAFT, [REFINE], num_samples=7, batch_size=batch_size))
    rest = list(
        api.generate(model, tokenizer, DRAFT, [REFINE], num_samples=7, batch_size=batch_size, skip_ids=range(kept))
    )
    assert _numbers(generated[:kept] + rest) == _numbers(generated)


def test_variable_length_drafts_cut_by_the_earlier_rule_are_not_resumed(loaded):
    model, tokenizer = loaded
    settings = dataclasses.replace(DRAFT, var_length=True)
    records = list(api.draft(model, tokenizer, settings, num_samples=2, seed=0, batch_size=2))
    assert made_with(records, _expect(loaded, settings=settings, num_samples=2)) is None
    older = [
        dataclasses.replace(r, stages=[{k: v for k, v in r.stages[0].items() if k != "stop_rule"}]) for r in records
    ]
    assert "stop_rule='did-0.1', this run uses 'bd3lm'" in made_with(
        older, _expect(loaded, settings=settings, num_samples=2)
    )
    fixed = [
        dataclasses.replace(d, stages=[{k: v for k, v in d.stages[0].items() if k != "stop_rule"}]) for d in records
    ]
    fixed = [dataclasses.replace(r, stages=[{**r.stages[0], "var_length": False}]) for r in fixed]
    assert "stop_rule" not in (made_with(fixed, _expect(loaded, num_samples=2)) or "")  # fixed length: unchanged
