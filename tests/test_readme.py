"""The README's Python API examples run as their comments say, with the embedded did-tiny in place of the Hub model."""

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Python API") : text.index("## The embedded tiny models")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "README's Python API section has the example and the resumable-output example"
    return [block.replace("num_samples=16, batch_size=16", "num_samples=2, batch_size=2") for block in blocks]


def test_readme_api_example_runs_with_did_tiny(capsys, tmp_path, monkeypatch):
    first, resumable = _blocks()
    assert '"kuleshov-group/bd3lm-owt-block_size4", device="cuda"' in first
    first = first.replace('"kuleshov-group/bd3lm-owt-block_size4", device="cuda"', '"did-tiny", device="cpu"')
    namespace: dict = {}
    exec(compile(first, str(README), "exec"), namespace)
    assert capsys.readouterr().out.strip()
    # The resumable output: a second run keeps every record of the first and draws nothing.
    monkeypatch.chdir(tmp_path)
    resumable = resumable.replace(", 16)", ", 2)")
    exec(compile(resumable, str(README), "exec"), namespace)
    first_run = (tmp_path / "drafts.jsonl").read_text()
    assert [json.loads(line)["id"] for line in first_run.splitlines()] == [0, 1]
    exec(compile(resumable, str(README), "exec"), namespace)
    assert (tmp_path / "drafts.jsonl").read_text() == first_run
