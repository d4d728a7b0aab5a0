"""Bad option values are refused before torch is imported: `did draft -n 0` answers at once, not after 2.5 s.

Each command's cases run in one subprocess, in order; after each the subprocess records whether torch (or
transformers) has been imported, so the first case that pays for the import is named.
"""

import json
import os
import subprocess
import sys

import pytest

RUN_CASES = """
import json, sys
from did_cli.cli import app
seen = []
for args in json.loads(sys.argv[1]):
    try:
        code = app(args, standalone_mode=False)  # the exit status of a refused run
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:  # a usage error click raises without standalone mode
        code = getattr(exc, "exit_code", repr(exc))
    seen.append([args, code, "torch" in sys.modules or "transformers" in sys.modules])
print(json.dumps(seen))
"""

CHEAP = {
    "draft": [
        ["-n", "0"],
        ["--batch-size", "0"],
        ["--batch-size", "100000000000000000000"],
        ["--dtype", "bogus"],
        ["--device", "cuda:x"],
        ["--kv-cache-dtype", "int8"],
        ["--no-kv-cache", "--kv-cache-dtype", "bfloat16"],
        ["--attn-backend", "xformers"],
        ["--top-p", "2"],
        ["--temperature", "0"],
        ["--order", "bogus"],
        ["--block-size", "0"],
        ["--length", "30", "--block-size", "4"],
        ["--max-tries", "0"],
        ["--reject-entropy", "-1"],
        ["--prompt", ""],
        ["--prompt-file", "/nonexistent/prompts.txt"],
        ["--out", "{dir}"],
    ],
    "generate": [
        ["-n", "0"],
        ["--gamma", "2"],
        ["--gamma", "x"],
        ["--remask", "bogus"],
        ["--stages", "x"],
        ["--block-size", "0"],
        ["--refine-cache", "0"],
        ["--dtype", "bogus"],
        ["--length", "32", "--stages", "4,5"],
    ],
    "refine": [
        ["{missing}"],
        ["{dir}"],
        ["--gamma", "2", "{missing}"],
        ["--remask", "bogus", "{missing}"],
        ["--batch-size", "0", "{missing}"],
        ["--dtype", "bogus", "{missing}"],
        ["--refine-cache", "2", "--block-size", "4", "{missing}"],
    ],
    "show": [["{missing}"], ["{dir}"], ["{missing}", "--html", "{dir}"]],
    "eval-ppl": [
        ["{missing}"],
        ["{dir}"],
        ["{records}", "--batch-size", "0"],
        ["{records}", "--context", "1"],
        ["{records}", "--dtype", "bogus"],
        ["{records}", "--json", "{records}"],
        ["{records}", "--per-sample", "-"],
    ],
    "eval-nll": [
        ["-m", "x", "--noise-draws", "0"],
        ["-m", "x", "--batch-size", "0"],
        ["-m", "x", "--block-size", "a"],
        ["-m", "x", "--seq-len", "1"],
        ["-m", "x", "--noise-layout", "bogus"],
        ["-m", "x", "--wrap-format", "bogus"],
        ["-m", "x", "--dtype", "bogus"],
        ["-m", "x", "--data", "{records}", "--json", "{records}"],
    ],
    "sweep": [
        ["-m", "x", "--num-samples", "0"],
        ["-m", "x", "--gamma", "2"],
        ["-m", "x", "--top-p", "2"],
        ["-m", "x", "--remask", "bogus"],
        ["-m", "x", "--dtype", "int8"],
        ["-m", "x", "--device", "cuda:x"],
        ["-m", "x", "--steps-per-block", "2", "--tokens-per-call", "2"],
    ],
}


@pytest.mark.parametrize("command", CHEAP)
def test_bad_options_are_refused_before_torch_is_imported(command, tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text('{"id": 0, "tokens": [0, 1], "confidence": [1.0, 0.5], "prompt_len": 1}\n')
    names = {"dir": str(tmp_path), "missing": str(tmp_path / "missing.jsonl"), "records": str(records)}
    cases = [[command, *(part.format(**names) for part in case)] for case in CHEAP[command]]
    done = subprocess.run(
        [sys.executable, "-c", RUN_CASES, json.dumps(cases)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for args, code, imported in json.loads(done.stdout):
        assert code not in (0, None), f"{args} was accepted"
        assert not imported, f"{args} imported torch before refusing"
