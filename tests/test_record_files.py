"""The record files: atomic --out, locks, what an interrupted file keeps, full disks, closed stdout, part files."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from did_cli.errors import InputError, OutputError, UsageError
from did_cli.record_files import RecordWriter, read_complete_records
from did_cli.records import Record


def _record(i: int = 0, **overrides) -> Record:
    body = dict(id=i, tokens=[0, 5, 6], confidence=[1.0, 0.5, 0.25], prompt_len=1, text="ab")
    return Record(**{**body, **overrides})


def test_non_finite_numbers_are_never_written_as_json(tmp_path):
    with pytest.raises(OutputError, match="NaN or infinite"), RecordWriter(tmp_path / "o.jsonl") as writer:
        writer.write(_record(confidence=[1.0, float("nan"), 0.1]))
    assert not (tmp_path / "o.jsonl").exists()


def test_out_is_replaced_only_when_the_run_finishes(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    with RecordWriter(out) as writer:
        writer.write(_record(0))
        assert out.read_text() == "old\n"  # untouched while the run goes on
        assert (tmp_path / "o.jsonl.partial").exists()
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0]
    assert not (tmp_path / "o.jsonl.partial").exists()


def test_an_interrupted_run_keeps_out_and_its_finished_records_beside_it(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), RecordWriter(out) as writer:
        writer.write(_record(0))
        writer.write(_record(1))
        raise KeyboardInterrupt
    assert out.read_text() == "old\n"
    kept = read_complete_records(tmp_path / "o.jsonl.partial").records
    assert [r.id for r in kept] == [0, 1]


def test_a_failure_before_any_record_leaves_no_partial_file(tmp_path):
    with pytest.raises(RuntimeError), RecordWriter(tmp_path / "o.jsonl"):
        raise RuntimeError("model failed to load")
    assert list(tmp_path.iterdir()) == []


def test_a_leftover_partial_file_is_refused_without_resume(tmp_path):
    out = tmp_path / "o.jsonl"
    (tmp_path / "o.jsonl.partial").write_text(_record(0).to_json() + "\n")
    with pytest.raises(OutputError, match="--resume"):
        RecordWriter(out).open()
    assert (tmp_path / "o.jsonl.partial").read_text().count("\n") == 1  # nothing lost


def test_resume_keeps_complete_records_and_drops_a_torn_last_line(tmp_path):
    out = tmp_path / "o.jsonl"
    partial = tmp_path / "o.jsonl.partial"
    partial.write_text(_record(0).to_json() + "\n" + _record(1).to_json() + "\n" + _record(2).to_json()[:20])
    with RecordWriter(out, resume=True) as writer:
        assert [r.id for r in writer.kept] == [0, 1]
        writer.write(_record(2))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 1, 2]


@pytest.mark.parametrize(
    ("last", "reason"),
    [(b"garbage", "not valid JSON"), (b'{"id": 2, "tokens": [0], "confidence": [NaN], "prompt_len": 0}', "NaN"),
     (b"\xff\xfe", "not UTF-8")],
)  # fmt: skip
def test_a_complete_but_damaged_last_line_is_dropped_with_a_note_naming_it(tmp_path, last, reason):
    partial = tmp_path / "o.jsonl.partial"
    partial.write_bytes((_record(0).to_json() + "\n" + _record(1).to_json() + "\n").encode() + last + b"\n")
    with RecordWriter(tmp_path / "o.jsonl", resume=True) as writer:
        assert [r.id for r in writer.kept] == [0, 1]
        assert writer.dropped.startswith(f"dropped line 3 of {partial}") and reason in writer.dropped
        writer.write(_record(2))
    assert [json.loads(line)["id"] for line in (tmp_path / "o.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_torn_last_line_is_dropped_without_a_note(tmp_path):
    partial = tmp_path / "o.jsonl.partial"
    partial.write_text(_record(0).to_json() + "\n" + "garbage")
    found = read_complete_records(partial)
    assert [r.id for r in found.records] == [0] and found.dropped is None
    assert found.size == len(_record(0).to_json()) + 1


def test_resume_refuses_corruption_before_the_last_line(tmp_path):
    (tmp_path / "o.jsonl.partial").write_text("garbage\n" + _record(1).to_json() + "\n")
    with pytest.raises(InputError, match="cannot resume"):
        RecordWriter(tmp_path / "o.jsonl", resume=True).open()


def test_resume_from_a_finished_file_keeps_it(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text(_record(0).to_json() + "\n")
    with RecordWriter(out, resume=True) as writer:
        assert [r.id for r in writer.kept] == [0]
        writer.write(_record(1))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 1]


def test_resume_needs_a_file():
    with pytest.raises(UsageError, match="--resume needs --out"):
        RecordWriter(None, resume=True).open()


@pytest.mark.parametrize("kind", ["directory", "under-a-file", "read-only"])
def test_unwritable_outputs_fail_when_the_writer_opens(tmp_path, kind):
    if kind == "directory":
        out = tmp_path
    elif kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "o.jsonl"
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "o.jsonl"
    with pytest.raises(OutputError):
        RecordWriter(out).open()


def test_a_second_writer_of_the_same_out_is_refused(tmp_path):
    out = tmp_path / "o.jsonl"
    code = (
        "import sys, time; from did_cli.record_files import RecordWriter\n"
        f"w = RecordWriter({str(out)!r}).open(); print('locked', flush=True); time.sleep(30)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match="another did run is writing"):
            RecordWriter(out).open()
    finally:
        holder.kill()
        holder.wait()
    with RecordWriter(out, resume=True):  # the lock dies with its process
        pass


def test_a_failed_write_is_cut_back_to_whole_lines(tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    real_write = os.write
    calls = {"n": 0}

    def flaky_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:  # the next record: half of it lands, then the disk is full
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    with RecordWriter(out) as writer:
        writer.write(_record(0))
        monkeypatch.setattr(os, "write", flaky_write)
        with pytest.raises(OutputError, match="No space left on device.*1 finished samples are kept"):
            writer.write(_record(1))
        monkeypatch.undo()
        writer.write(_record(2))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 2]


def test_a_full_tmpfs_leaves_whole_lines_only(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mount / "o.jsonl"
        big = _record(0, tokens=[0] + [7] * 400, confidence=[1.0] + [0.123456] * 400)
        with pytest.raises(OutputError, match="No space left"), RecordWriter(out) as writer:
            for i in range(100):
                writer.write(Record(**{**big.__dict__, "id": i}))
        partial = mount / "o.jsonl.partial"
        lines = partial.read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(json.loads(line)["id"] >= 0 for line in lines[:-1])
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_records_to_a_full_device_as_stdout_are_one_line_errors():
    code = (
        "from did_cli.record_files import RecordWriter\nfrom did_cli.records import Record\n"
        "RecordWriter(None).open().write(Record(0, [0, 1], [1.0, 0.5], 1))"
    )
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", code], stdout=full, stderr=subprocess.PIPE, text=True)
    assert done.returncode != 0 and "No space left on device" in done.stderr


def test_a_closed_stdout_is_an_output_error():
    code = (
        "import sys\nfrom did_cli.record_files import RecordWriter\n"
        "try:\n    RecordWriter(None).open()\n"
        "except Exception as e:\n    sys.stderr.write(type(e).__name__ + ': ' + str(e))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(),
        close_fds=True,
        preexec_fn=lambda: os.close(1),
    )
    assert "OutputError: stdout is closed" in done.stderr


def test_partial_name_sits_beside_out():
    assert RecordWriter(Path("a/b.jsonl")).partial == Path("a/b.jsonl.partial")


def test_out_may_be_a_device_a_pipe_or_a_symlink_and_stays_one(tmp_path):
    with RecordWriter("/dev/null") as writer:
        writer.write(_record(0))
    assert Path("/dev/null").is_char_device()
    target = tmp_path / "target.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with RecordWriter(link) as writer:
        writer.write(_record(3))
    assert link.is_symlink() and json.loads(target.read_text())["id"] == 3
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    with RecordWriter(fifo) as writer:
        writer.write(_record(5))
    assert json.loads(reader.communicate(timeout=10)[0])["id"] == 5
    assert fifo.is_fifo()


@pytest.mark.parametrize("name", ["", "."])
def test_an_empty_out_name_is_refused(name):
    with pytest.raises(OutputError, match="needs a file name"):
        RecordWriter(name).open()


def test_a_record_holding_mask_or_an_id_beyond_its_tokenizer_is_never_written(tmp_path):
    out = tmp_path / "o.jsonl"
    message = "holds token id 68, outside its tokenizer's 68 ids"
    with pytest.raises(OutputError, match=message) as info, RecordWriter(out) as writer:
        writer.write(_record(0, tokenizer={"name": "chars", "vocab_size": 68}))
        writer.write(_record(1, tokens=[0, 68, 6], tokenizer={"name": "chars", "vocab_size": 68}))
    assert "\n" not in str(info.value)
    assert [r.id for r in read_complete_records(tmp_path / "o.jsonl.partial").records] == [0]


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("victim_content", ["", "precious\n"])
def test_a_planted_partial_symlink_is_refused_and_its_target_kept(tmp_path, resume, victim_content):
    victim = tmp_path / "victim.txt"
    victim.write_text(victim_content)
    out = tmp_path / "o.jsonl"
    (tmp_path / "o.jsonl.partial").symlink_to(victim)
    with pytest.raises(OutputError, match="o.jsonl.partial is a symbolic link"), RecordWriter(out, resume=resume) as w:
        w.write(_record(0))
    assert victim.read_text() == victim_content and not out.exists()
    assert (tmp_path / "o.jsonl.partial").is_symlink()


def test_a_planted_fifo_as_partial_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "o.jsonl.partial")
    with pytest.raises(OutputError, match="not a regular file"):
        RecordWriter(tmp_path / "o.jsonl", resume=True).open()


def test_a_full_disk_says_how_the_caller_continues(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with RecordWriter(tmp_path / "o.jsonl", how_to_continue="run the same command again to continue") as writer:
        writer.write(_record(0))
        monkeypatch.setattr(os, "write", full)
        with pytest.raises(OutputError) as info:
            writer.write(_record(1))
        monkeypatch.undo()
    message = str(info.value)
    assert "o.jsonl.partial" in message and "run the same command again" in message and "--resume" not in message
