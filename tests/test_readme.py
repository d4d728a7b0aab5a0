"""The README's Python API example runs as its comment says, with the embedded did-tiny in place of the Hub model."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs_with_did_tiny(capsys):
    text = README.read_text(encoding="utf-8")
    block = re.search(r"### Python API\s+```python\n(.*?)```", text, re.S)
    assert block, "README has no Python API example"
    code = block.group(1)
    assert '"kuleshov-group/bd3lm-owt-block_size4", device="cuda"' in code
    code = code.replace('"kuleshov-group/bd3lm-owt-block_size4", device="cuda"', '"did-tiny", device="cpu"')
    code = code.replace("num_samples=16, batch_size=16", "num_samples=2, batch_size=2")
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out.strip()
