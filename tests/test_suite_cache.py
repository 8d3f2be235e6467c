"""The suite's own cache (tests/conftest.py): kept per installed versions and builder sources, and pruned."""

from __future__ import annotations

import os
import time

from conftest import STALE_AFTER_S, prune_stale_suite_caches


def test_a_run_marks_its_cache_used_and_removes_only_caches_unused_for_days(tmp_path) -> None:
    long_ago = time.time() - STALE_AFTER_S - 3600
    current, recent, stale = (tmp_path / name for name in ("current", "recent", "stale"))
    for folder in (current, recent, stale):
        (folder / "qloader").mkdir(parents=True)
        os.utime(folder, (long_ago, long_ago))
    os.utime(recent, (time.time() - STALE_AFTER_S + 3600,) * 2)
    (tmp_path / "a-file").write_text("not a cache folder")
    os.utime(tmp_path / "a-file", (long_ago, long_ago))

    assert prune_stale_suite_caches(current) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "current", "recent"]
    assert time.time() - current.stat().st_mtime < STALE_AFTER_S  # marked used: kept by other revisions
    assert (current / "qloader").is_dir()
