import pytest

from did_cli.evaluation import Judge, load_judge
from tests.evaluation.tiny_judge import save_tiny_judge


@pytest.fixture(scope="session")
def judge_folder(tmp_path_factory):
    return save_tiny_judge(tmp_path_factory.mktemp("judge") / "tiny-judge")


@pytest.fixture(scope="session")
def judge(judge_folder) -> Judge:
    return load_judge(str(judge_folder), device="cpu")
