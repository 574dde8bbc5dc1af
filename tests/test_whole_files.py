"""written_whole: the trainer's checkpoint and metrics, the data cache and the benchmark's JSON are
replaced whole or not at all, and no partial file outlives its write."""

import os

import pytest

from fastavg.whole_files import written_whole


def test_a_finished_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_text("old")
    with written_whole(str(path)) as partial:
        with open(partial, "w") as f:
            f.write("new")
        assert path.read_text() == "old"  # nothing changes before the block ends
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_failed_write_keeps_the_old_file_and_deletes_its_partial_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("kept")
    with pytest.raises(OSError, match="No space"):
        with written_whole(str(path)) as partial:
            with open(partial, "w") as f:
                f.write("half")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "kept" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_what_a_killed_write_left_is_replaced_by_the_next_one(tmp_path):
    # A kill (SIGKILL, a lost node) skips the clean-up. With a name per process, every kill would
    # leave another checkpoint-sized file behind for good.
    path = tmp_path / "ckpt.pt"
    (tmp_path / "ckpt.pt.partial").write_text("left by a killed run")
    with written_whole(str(path)) as partial, open(partial, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_concurrent_writers_each_write_a_file_of_their_own(tmp_path):
    path = str(tmp_path / "train.bin")
    with written_whole(path, concurrent_writers=True) as mine, written_whole(path) as shared:
        assert mine.endswith(str(os.getpid())) and mine != shared
        for name in (mine, shared):
            open(name, "w").close()
    assert os.listdir(tmp_path) == ["train.bin"]
