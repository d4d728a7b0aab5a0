import pytest

from tests.evaluation.tiny_judge import save_tiny_judge


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    """A tiny random GPT-2 judge folder with the character tokenizer."""
    return str(save_tiny_judge(tmp_path_factory.mktemp("judge") / "tiny-judge"))
