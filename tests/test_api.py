"""What the API tells a progress display: which stage runs, its calls and tokens, and the run's sample counts."""

import pytest

from did_cli import api
from did_cli.checkpoints import load_model, load_tokenizer
from did_cli.settings import DraftSettings, RefineSettings

DRAFT = DraftSettings(length=32, block_size=4)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    model = load_model(str(tiny_checkpoint))
    return model, load_tokenizer(model)


def test_generate_reports_every_stage_with_its_place_in_the_schedule(loaded):
    model, tokenizer = loaded
    events = []
    refine = [RefineSettings(gamma=0.5), RefineSettings(gamma=0.25)]
    run = api.generate(model, tokenizer, DRAFT, refine, num_samples=3, batch_size=2, on_progress=events.append)
    records = list(run)
    assert len(records) == 3
    assert {e.stages for e in events} == {3}
    working = [e for e in events if e.tokens_total]  # events of a stage at work on a batch
    assert {(e.stage, e.stage_index) for e in working} == {("draft", 0), ("refine", 1), ("refine", 2)}
    # Refine stages know the run's counts: samples finished before their batch, of 3.
    assert all(e.samples_total == 3 for e in working)
    assert [e.samples_done for e in working if e.stage_index == 2][-1] == 2  # the second batch (one sample)
    assert [e.batch for e in working if e.stage_index == 1][0] == 2
    # Each refine stage first says it starts (no tokens yet), so a display never shows the draft's last count.
    starts = [i for i, e in enumerate(events) if e.stage == "refine" and e.tokens_total == 0]
    assert len(starts) == 4  # two stages × two batches
    assert all(events[i - 1].stage_index == events[i].stage_index - 1 for i in starts)


def test_progress_counts_the_calls_and_tokens_of_the_running_stage(loaded):
    model, tokenizer = loaded
    events = []
    list(api.generate(model, tokenizer, DRAFT, [RefineSettings(gamma=0.5)], num_samples=2, batch_size=2,
                      on_progress=events.append))  # fmt: skip
    for index in (0, 1):
        stage = [e for e in events if e.stage_index == index and e.tokens_total]
        assert [e.calls for e in stage] == list(range(1, len(stage) + 1))  # one event per model call
        tokens = [e.tokens_done for e in stage]
        assert tokens == sorted(tokens) and tokens[-1] == stage[-1].tokens_total
    draft_total = next(e.tokens_total for e in events if e.stage_index == 0 and e.tokens_total)
    refine_total = next(e.tokens_total for e in events if e.stage_index == 1 and e.tokens_total)
    assert draft_total == 2 * 31 and refine_total == 2 * 16  # 31 generated tokens each, half of them remasked


def test_draft_and_refine_alone_are_one_stage_runs(loaded):
    model, tokenizer = loaded
    events = []
    drafts = list(api.draft(model, tokenizer, DRAFT, num_samples=2, batch_size=2, on_progress=events.append))
    list(api.refine(model, tokenizer, drafts, RefineSettings(gamma=0.5), batch_size=2, on_progress=events.append))
    assert {(e.stage, e.stage_index, e.stages) for e in events} == {("draft", 0, 1), ("refine", 0, 1)}
    assert {e.batch for e in events if e.tokens_total} == {2}
