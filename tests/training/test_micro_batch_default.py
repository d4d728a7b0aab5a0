"""`--batch-size` alone is enough: the micro batch defaults to a divisor of the per-process batch."""

import json

from did_cli.settings import FinetuneSettings
from did_cli.training.loop import finetune


def test_small_batch_trains_without_a_micro_batch_flag_and_records_the_size_used(tmp_path, tiny_checkpoint):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the cat sat on mat number {i} and ran away.\n" for i in range(60)))
    settings = FinetuneSettings(
        out=str(tmp_path / "run"),
        model=str(tiny_checkpoint),
        data=str(corpus),
        mix="4:1",
        seq_len=32,
        steps=1,
        batch_size=8,
        warmup=0,
        val_every=0,
        val_batches=0,
        cache_dir=str(tmp_path / "cache"),
    )
    assert settings.micro_batch_size is None
    result = finetune(settings)
    assert result.steps == 1
    recorded = json.loads((tmp_path / "run" / "settings.json").read_text())["settings"]
    assert recorded["micro_batch_size"] == 8 and recorded["batch_size"] == 8
