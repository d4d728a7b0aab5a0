"""The declared layers hold (import-linter, as `.ci/run` checks them), and breaking one is caught."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
pytestmark = pytest.mark.skipif(not Path(LINT).exists(), reason="import-linter is not installed (the dev extra)")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT, "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    shutil.copytree(ROOT / "did_cli", root / "did_cli", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_declared_layers_hold(tmp_path):
    done = _lint(_copy(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("model.py", "from did_cli import api  # noqa"),  # the model reaching up to the API
        ("cli/draft.py", "from did_cli.cli import refine  # noqa"),  # one command importing another
        ("config.py", "from did_cli.sampling import remask  # noqa"),  # the cycle the redesign removed
    ],
)
def test_a_broken_layer_is_caught(tmp_path, module, upward):
    root = _copy(tmp_path)
    path = root / "did_cli" / module
    path.write_text(path.read_text() + "\n" + upward + "\n")
    done = _lint(root)
    assert done.returncode != 0 and "BROKEN" in done.stdout
