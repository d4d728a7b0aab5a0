import os
import stat
import sys

import pytest

from did_cli import files
from did_cli.errors import InputError, OutputError, UsageError
from did_cli.files import (
    atomic_folder,
    follow_links,
    output_target,
    refuse_overwriting_inputs,
    stdin_stream,
    write_output,
    write_text_atomically,
)


def test_atomic_folder_replaces_the_target_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert (target / "old.txt").read_text() == "old" and not (target / "new.txt").exists()
    with atomic_folder(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folder left behind


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "f") as staging:
            (staging / "w.bin").write_bytes(b"x")
        write_text_atomically(tmp_path / "r.md", "text")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f" / "w.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "r.md").stat().st_mode) == 0o644
    assert (tmp_path / "r.md").read_text() == "text"


def _shared_folder(tmp_path):
    """A sticky, world-writable folder like /tmp."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o1777)
    return folder


def _planted_by_another_user(link, monkeypatch):
    if os.geteuid() == 0:
        os.lchown(link, 4242, 4242)
    else:  # only root can give a link away: say it belongs to someone else
        monkeypatch.setattr(files, "_link_owner", lambda path: 4242 if path == link else os.lstat(path).st_uid)


def test_an_output_link_another_user_planted_in_a_sticky_folder_is_refused(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = _shared_folder(tmp_path) / "out.json"
    link.symlink_to(victim)
    _planted_by_another_user(link, monkeypatch)
    with pytest.raises(OutputError, match="anyone can write to, owned by another user"):
        output_target(link, "--json")
    with pytest.raises(OutputError, match="anyone can write to"):
        write_text_atomically(link, "overwritten")
    # A link in a component of the path counts too: /tmp/planted-dir/out.json.
    folder_link = link.parent / "dir"
    folder_link.symlink_to(tmp_path, target_is_directory=True)
    _planted_by_another_user(folder_link, monkeypatch)
    with pytest.raises(OutputError, match="anyone can write to"):
        output_target(folder_link / "victim.txt", "--out")
    assert victim.read_text() == "precious"


def test_an_output_link_of_ones_own_is_followed_even_in_a_sticky_folder(tmp_path):
    target = tmp_path / "runs" / "3.json"
    target.parent.mkdir()
    link = _shared_folder(tmp_path) / "latest.json"
    link.symlink_to(target)
    assert output_target(link, "--json") == target
    write_text_atomically(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_links_resolve_as_the_kernel_resolves_them(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to("..")
    (tmp_path / "rel").symlink_to("sub/../target.txt")
    assert follow_links(tmp_path / "sub" / "up" / "rel", "--out") == tmp_path / "target.txt"
    assert follow_links(tmp_path / "sub" / "up" / ".." / tmp_path.name / "x", "--out") == tmp_path / "x"
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(OutputError, match="too many levels of symbolic links"):
        output_target(tmp_path / "a", "--out")


def test_an_output_is_refused_when_it_is_an_input_or_another_output(tmp_path):
    data = tmp_path / "c.txt"
    data.write_text("x")
    (tmp_path / "hard.txt").hardlink_to(data)
    (tmp_path / "soft.txt").symlink_to(data)
    for out in ("c.txt", "hard.txt", "soft.txt"):
        with pytest.raises(UsageError, match="is an input"):
            refuse_overwriting_inputs([("--json", tmp_path / out)], [("--data", data)])
    with pytest.raises(UsageError, match="inside an input folder"):
        refuse_overwriting_inputs([("--json", data)], [("--data", tmp_path)])
    with pytest.raises(UsageError, match="--json and --per-sequence name the same file"):
        refuse_overwriting_inputs([("--json", tmp_path / "o"), ("--per-sequence", tmp_path / "o")], [])
    refuse_overwriting_inputs([("--json", tmp_path / "new.json"), ("--x", "-")], [("--data", data), ("-", "-")])
    refuse_overwriting_inputs([("--json", tmp_path / "new.json")], [("--data", tmp_path)])  # a new file: no loss


def test_closed_standard_streams_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(InputError, match="stdin is closed"):
        stdin_stream()
    with pytest.raises(OutputError, match="stdout is closed; pass a file name"):
        write_output("-", "{}")
