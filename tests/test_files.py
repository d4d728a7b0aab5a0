import os
import stat

import pytest

from did_cli.files import atomic_folder, write_text_atomically


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
