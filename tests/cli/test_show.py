import json

import pytest
from typer.testing import CliRunner

from did_cli import display
from did_cli.cli import app
from tests.test_display import assert_well_formed_and_self_contained

runner = CliRunner()


@pytest.fixture(scope="module")
def samples(tiny_checkpoint, tmp_path_factory):
    """Real records from the tiny checkpoint: two drafts with a prompt, and their refinement (gamma 0.5)."""
    folder = tmp_path_factory.mktemp("show")
    drafts, refined = folder / "drafts.jsonl", folder / "refined.jsonl"
    model = str(tiny_checkpoint)
    result = runner.invoke(app, ["draft", "-m", model, "-n", "2", "--prompt", "Hi", "--out", str(drafts), "-q"])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["refine", str(drafts), "-m", model, "--gamma", "0.5", "--out", str(refined), "-q"])
    assert result.exit_code == 0, result.stderr
    return drafts, refined


def _first(path):
    return json.loads(path.read_text().splitlines()[0])


def test_show_help_lists_its_options():
    result = runner.invoke(app, ["show", "--help"])
    assert result.exit_code == 0
    for option in ("--index", "--html", "--model", "--tokenizer"):
        assert option in result.stdout


def test_show_draft_prints_tokens_legend_and_summary(samples, char_tokenizer):
    drafts, _ = samples
    result = runner.invoke(app, ["show", str(drafts)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    record = _first(drafts)
    assert lines[0].startswith("sample id 0 (seed 0)")
    text = char_tokenizer.decode(record["tokens"][record["prompt_len"] :])
    assert display.visible(text) in result.stdout
    assert any(line.startswith("legend:") for line in lines)
    assert lines[-1].startswith(f"draft: {len(record['tokens']) - record['prompt_len']} generated tokens")


def test_show_refined_shows_each_changed_token_beside_its_draft(samples, char_tokenizer):
    _, refined = samples
    result = runner.invoke(app, ["show", str(refined)])
    assert result.exit_code == 0, result.stderr
    record = _first(refined)
    changed = [i for i, (a, b) in enumerate(zip(record["draft_tokens"], record["tokens"], strict=True)) if a != b]
    assert changed, "the tiny model should change some remasked tokens at gamma 0.5"
    for i in changed:
        old, new = (
            display.visible(char_tokenizer.decode([t])) for t in (record["draft_tokens"][i], record["tokens"][i])
        )
        assert f"[{old}→{new}]" in result.stdout
    summary = result.stdout.splitlines()[-1]
    generated = len(record["tokens"]) - record["prompt_len"]
    remasked = len(record["stages"][-1]["remasked"])
    assert summary.startswith(f"refined (1 refinement): {len(changed)} of {generated} generated tokens differ")
    assert f"{remasked} remasked by the last refinement (snapshot, γ=0.5" in summary
    assert "legend:" in result.stdout and "remasked by the last refinement" in result.stdout


def test_show_reads_stdin_and_picks_the_record_by_position(samples):
    drafts, _ = samples
    second = runner.invoke(app, ["show", "-", "--index", "1"], input=drafts.read_text())
    assert second.exit_code == 0, second.stderr
    assert second.stdout.startswith("sample id 1 ")
    last = runner.invoke(app, ["show", str(drafts), "--index", "-1"])
    assert last.stdout == second.stdout


@pytest.mark.parametrize("index", ["2", "-3"])
def test_show_index_out_of_range_is_a_one_line_error(samples, index):
    drafts, _ = samples
    result = runner.invoke(app, ["show", str(drafts), "--index", index])
    assert result.exit_code == 2
    assert result.stderr == f"error: {drafts} holds 2 records; --index {index} is out of range\n"


def test_show_bad_files_are_one_line_errors(tmp_path):
    missing = runner.invoke(app, ["show", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    bad = runner.invoke(app, ["show", str(garbage)])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "line 1: not valid JSON" in bad.stderr


def test_show_html_writes_a_self_contained_page_atomically(samples, tmp_path):
    _, refined = samples
    out = tmp_path / "pages" / "sample.html"
    result = runner.invoke(app, ["show", str(refined), "--html", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == f"wrote {out}\n"
    page = out.read_text(encoding="utf-8")
    assert_well_formed_and_self_contained(page)
    assert '<span class="c' in page and '<del class="draft">' in page
    assert [p.name for p in out.parent.iterdir()] == ["sample.html"]


def test_show_html_dash_writes_the_page_to_stdout(samples):
    drafts, _ = samples
    result = runner.invoke(app, ["show", str(drafts), "--html", "-"])
    assert result.exit_code == 0, result.stderr
    assert_well_formed_and_self_contained(result.stdout)


def test_show_needs_a_loadable_tokenizer_and_accepts_overrides(samples, tmp_path, tiny_checkpoint):
    drafts, _ = samples
    record = _first(drafts)
    record["model"]["name"] = record["tokenizer"]["name"] = str(tmp_path / "moved")
    for info in (record["model"], record["tokenizer"], *(stage["model"] for stage in record["stages"])):
        info.pop("path", None)  # the checkpoint moved: no recorded name or path resolves any more
        info["name"] = str(tmp_path / "moved")
    moved = tmp_path / "moved.jsonl"
    moved.write_text(json.dumps(record) + "\n")
    failed = runner.invoke(app, ["show", str(moved)])
    assert failed.exit_code == 2 and failed.stderr.count("\n") == 1
    assert "pass --tokenizer or --model" in failed.stderr
    for flag in ("--tokenizer", "--model"):
        result = runner.invoke(app, ["show", str(moved), flag, str(tiny_checkpoint)])
        assert result.exit_code == 0, result.stderr
        assert result.stdout.startswith("sample id 0 ")


def test_show_refuses_ids_the_tokenizer_cannot_decode(tmp_path, tiny_checkpoint):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"id": 7, "tokens": [67, 999], "confidence": [1.0, 0.5], "prompt_len": 1}) + "\n")
    result = runner.invoke(app, ["show", str(path), "--tokenizer", str(tiny_checkpoint)])
    assert result.exit_code == 2
    assert result.stderr == "error: record 7 holds token ids beyond the tokenizer's 68; pass the right --tokenizer\n"


def test_show_prints_and_escapes_hostile_record_fields(samples, tmp_path, tiny_checkpoint):
    from tests.test_display import HOSTILE

    _, refined = samples
    record = _first(refined)
    record["model"]["name"] = record["tokenizer"]["name"] = record["text"] = HOSTILE
    record["stages"][-1]["remask"] = HOSTILE
    path = tmp_path / "hostile.jsonl"
    path.write_text(json.dumps(record) + "\n")
    shown = runner.invoke(app, ["show", str(path), "--tokenizer", str(tiny_checkpoint)])
    assert shown.exit_code == 0, shown.stderr
    assert f"from {HOSTILE}:" in shown.stdout and f"({HOSTILE}, γ=0.5" in shown.stdout
    page = runner.invoke(app, ["show", str(path), "--tokenizer", str(tiny_checkpoint), "--html", "-"])
    assert page.exit_code == 0, page.stderr
    assert_well_formed_and_self_contained(page.stdout)
    assert HOSTILE not in page.stdout and "&lt;/title&gt;&lt;script&gt;" in page.stdout


def test_show_text_prints_every_records_text_as_jq_would(samples):
    _, refined = samples
    texts = [json.loads(line)["text"] for line in refined.read_text().splitlines()]
    result = runner.invoke(app, ["show", str(refined), "--text"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "".join(text + "\n" for text in texts) and result.stderr == ""  # `jq -r .text`
    second = runner.invoke(app, ["show", "-", "--text", "--index", "1"], input=refined.read_text())
    assert second.exit_code == 0 and second.stdout == texts[1] + "\n"


def test_show_text_needs_no_tokenizer(samples, tmp_path):
    drafts, _ = samples
    record = _first(drafts)
    record["tokenizer"]["name"] = record["model"]["name"] = str(tmp_path / "gone")  # nothing to load a tokenizer from
    moved = tmp_path / "moved.jsonl"
    moved.write_text(json.dumps(record) + "\n")
    result = runner.invoke(app, ["show", str(moved), "--text"])
    assert result.exit_code == 0 and result.stdout == record["text"] + "\n"


def test_show_text_keeps_a_pipe_verbatim_and_shows_control_characters_on_a_terminal(capsys):
    from did_cli.cli.show import print_texts
    from did_cli.records import Record

    text = "line one\n\x1b]0;title\x07clear\x1b[2J\rover"
    record = Record(id=0, tokens=[0], confidence=[1.0], prompt_len=1, text=text)
    print_texts([record], terminal=False)
    assert capsys.readouterr().out == text + "\n"
    print_texts([record], terminal=True)
    assert capsys.readouterr().out == "line one\n␛]0;title␇clear␛[2J␍over\n"  # line breaks kept, the rest shown


@pytest.mark.parametrize("extra", [["--html", "page.html"], ["--model", "m"], ["--tokenizer", "t"]])
def test_show_text_refuses_options_it_would_ignore(samples, extra):
    drafts, _ = samples
    result = runner.invoke(app, ["show", str(drafts), "--text", *extra])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"--text prints the records' own text; it takes no {extra[0]}" in result.stderr
