"""checkpoint.py: atomic writes with the usual permissions, no temporary left behind, folders checked up front."""

import os

import pytest
import torch

from util.checkpoint import check_writable, read_checkpoint, save_checkpoint, write_atomic


def test_written_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
        write_atomic(tmp_path / "log.txt", lambda temp: open(temp, "w").write("x"))
        os.umask(0o077)
        write_atomic(tmp_path / "private.txt", lambda temp: open(temp, "w").write("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "log.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600  # the umask is respected


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})

    def crash(temp):
        open(temp, "w").write("half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "checkpoint.pt", crash)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / ".checkpoint.pt.999999999.abc.tmp"  # no process has this id
    live = tmp_path / f".checkpoint.pt.{os.getpid()}.def.tmp"  # a write in progress (this process)
    other = tmp_path / ".other.pt.999999999.abc.tmp"  # another file's: not ours to judge here
    for path in (dead, live, other):
        path.write_text("partial")
    save_checkpoint(tmp_path / "checkpoint.pt", {"step": 2})
    assert not dead.exists() and live.exists() and other.exists()


def test_an_output_folder_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--out .*a_file/sub: cannot write there"):
        check_writable(tmp_path / "a_file" / "sub", "--out")
    assert check_writable(tmp_path / "new" / "folder").is_dir()


def test_unreadable_checkpoints_are_named_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume .*nothing.pt: no such file"):
        read_checkpoint(tmp_path / "nothing.pt", "--resume")
    with pytest.raises(ValueError, match="is a folder"):
        read_checkpoint(tmp_path, "--ckpt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a dict, got list"):
        read_checkpoint(tmp_path / "list.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"not a checkpoint written by train.py \(it lacks \['step'\]\)"):
        read_checkpoint(tmp_path / "partial.pt", required=("model", "step"))
