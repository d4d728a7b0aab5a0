import dataclasses
import json

import pytest
import torch

from did_cli.checkpoints import load_model
from did_cli.errors import UsageError
from did_cli.training.clip_search import ClipState, block_losses, clip_candidates, search_clip, summed_variance
from did_cli.training.loop import finetune
from did_cli.training.state import STATE
from tests.conftest import make_tiny_model
from tests.training.conftest import make_settings as _settings


def test_candidates_are_the_full_interval_and_every_width_on_a_005_grid():
    candidates = clip_candidates()
    assert candidates[0] == (0.001, 1.0)
    expected = {(0.001, 1.0)}
    for width in (0.5, 0.6, 0.7, 0.8, 0.9):
        start = 0
        while start + width * 100 <= 100 + 1e-9:
            expected.add((max(start / 100, 0.001), round(start / 100 + width, 10)))
            start += 5
    assert set(candidates) == expected
    assert len(candidates) == len(expected) == 36
    assert (0.5, 1.0) in candidates and (0.1, 1.0) in candidates and (0.001, 0.5) in candidates


def test_search_picks_the_lowest_summed_variance_on_a_synthetic_case():
    spread = {(0.001, 1.0): 3.0, (0.2, 0.8): 0.5, (0.3, 0.9): 0.1, (0.5, 1.0): 0.2}
    base = torch.linspace(-1, 1, 24, dtype=torch.float64).view(4, 6)

    def losses_for(interval):
        # Two batches; the second varies twice as much, so only the sum over batches ranks them consistently.
        return [2.0 + spread[interval] * base, 5.0 + 2 * spread[interval] * base]

    chosen, table = search_clip(list(spread), losses_for)
    assert chosen == (0.3, 0.9)
    manual = float(base.var()) * (0.1**2) * (1 + 4)
    assert table["0.3,0.9"] == pytest.approx(manual, rel=1e-9)
    assert summed_variance([torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])]) == pytest.approx(2.0)


def test_real_block_losses_prefer_a_clipped_interval_over_the_unclipped_schedule():
    model = make_tiny_model(dropout=0.0)
    batches = [torch.randint(0, 68, (8, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def losses_for(interval):
        return [block_losses(model, b, 4, interval, torch.Generator().manual_seed(i)) for i, b in enumerate(batches)]

    losses = losses_for((0.5, 1.0))[0]
    assert losses.shape == (8, 8)
    chosen, table = search_clip([(0.001, 1.0), (0.5, 1.0)], losses_for)
    assert chosen == (0.5, 1.0)
    assert table["0.001,1"] > 5 * table["0.5,1"]


def test_clip_state_round_trips():
    state = ClipState()
    state.intervals = {4: (0.3, 0.8), 32: (0.001, 1.0)}
    again = ClipState()
    again.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert again.intervals == state.intervals


def test_clip_auto_searches_at_validation_and_records_the_choice(tmp_path, tiny_checkpoint, corpus):  # noqa: F811
    settings = _settings(tmp_path, tiny_checkpoint, corpus, steps=6, val_every=3, val_batches=1, save_every=3)
    result = finetune(dataclasses.replace(settings, clip="auto"))
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    searches = [e for e in events if e["event"] == "clip_search"]
    assert {e["step"] for e in searches} == {3, 6} and {e["block_size"] for e in searches} == {4, 32}
    last = {e["block_size"]: e for e in searches if e["step"] == 6}
    for event in last.values():
        variances = event["variance"]
        assert min(variances, key=variances.get) == "{:g},{:g}".format(*event["clip"])
    # The step-3 checkpoint holds the step-3 choice, so a resumed run continues with it.
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / STATE).read_text())
    first = {e["block_size"]: e["clip"] for e in searches if e["step"] == 3}
    assert saved["clip_search"] == {"intervals": {str(s): c for s, c in first.items()}}
    config = load_model(str(result.final)).config
    assert config.extra["did_training_clip"] == {str(s): last[s]["clip"] for s in (4, 32)}
    assert (config.sampling_eps_min, config.sampling_eps_max) == tuple(last[4]["clip"])


def test_clip_auto_needs_validation(tmp_path, tiny_checkpoint, corpus):  # noqa: F811
    with pytest.raises(UsageError, match="--clip auto"):
        finetune(_settings(tmp_path, tiny_checkpoint, corpus, steps=2, val_every=0, clip="auto"))
