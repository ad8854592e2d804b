"""The committer: never an older snapshot over a newer one, tombstones, unique temp files,
crash at every step leaves the old or the new record, `durable()`."""

from __future__ import annotations

import json
import threading

import pytest

from vscsi.durable import faults
from vscsi.durable.committer import CommitError, Committer


def test_save_load_and_restart(tmp_path):
    c = Committer(tmp_path)
    assert c.save("pairs", "db", {"status": "PAIR"})
    assert c.load("pairs", "db") == {"status": "PAIR"}
    again = Committer(tmp_path)
    assert again.items("pairs") == {"db": {"status": "PAIR"}}
    assert again.stamp() > c.get("pairs", "db").generation  # the counter resumes above


def test_older_snapshot_never_overwrites_newer(tmp_path):
    """D2: a checkpoint stamped before a split, written after it, is dropped."""
    c = Committer(tmp_path)
    old = c.stamp()  # the checkpoint's snapshot (status PAIR)
    new = c.stamp()  # the split's snapshot (status PSUS)
    assert c.commit("pairs", "db", {"status": "PSUS"}, new)
    assert not c.commit("pairs", "db", {"status": "PAIR"}, old)
    assert Committer(tmp_path).load("pairs", "db") == {"status": "PSUS"}


def test_tombstone_blocks_late_checkpoint_until_create(tmp_path):
    """D3: a deleted object's late checkpoint (even stamped after the delete) cannot bring it
    back; only a create can."""
    c = Committer(tmp_path)
    c.save("pairs", "db", {"status": "PAIR"}, create=True)
    assert c.delete("pairs", "db")
    assert not c.save("pairs", "db", {"status": "PAIR"})
    restarted = Committer(tmp_path)
    assert restarted.items("pairs") == {}
    assert restarted.get("pairs", "db").deleted
    assert restarted.save("pairs", "db", {"status": "COPY"}, create=True)
    assert Committer(tmp_path).load("pairs", "db") == {"status": "COPY"}


def test_concurrent_savers_share_no_temp_file(tmp_path):
    """D4: two threads saving one key: no exception, every read parses, the newest wins."""
    c = Committer(tmp_path)
    errors: list[BaseException] = []
    bad = [0]
    stop = threading.Event()
    path = tmp_path / "pairs" / "p.json"

    def saver(k: int) -> None:
        for i in range(150):
            try:
                c.save("pairs", "p", {"i": i, "k": k, "pad": "x" * (k * 997)})
            except BaseException as e:  # pragma: no cover - the failure being tested
                errors.append(e)

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads(path.read_bytes())
            except FileNotFoundError:
                pass
            except ValueError:
                bad[0] += 1

    r = threading.Thread(target=reader)
    r.start()
    ts = [threading.Thread(target=saver, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    r.join()
    assert errors == [] and bad[0] == 0
    entry = c.get("pairs", "p")
    assert Committer(tmp_path).get("pairs", "p") == entry
    assert not list((tmp_path / "pairs").glob("*.tmp"))


@pytest.mark.parametrize("point", ["commit.written", "commit.synced", "commit.renamed"])
def test_crash_at_each_step_leaves_old_or_new(tmp_path, point):
    c = Committer(tmp_path)
    c.save("pairs", "db", {"v": 1})

    def hook(name: str) -> None:
        if name == point:
            raise faults.Crash(name)

    with faults.installed(hook), pytest.raises(faults.Crash):
        c.save("pairs", "db", {"v": 2})
    after = Committer(tmp_path)  # the next start
    assert after.load("pairs", "db") in ({"v": 1}, {"v": 2})
    if point == "commit.renamed":
        assert after.load("pairs", "db") == {"v": 2}
    else:
        assert after.load("pairs", "db") == {"v": 1}
    assert not list((tmp_path / "pairs").glob("*.tmp"))


def test_durable_waits_for_outstanding_stamps(tmp_path):
    c = Committer(tmp_path)
    a = c.stamp()
    b = c.stamp()
    assert c.durable() == a - 1
    c.commit("pairs", "x", {}, b)
    assert c.durable() == a - 1  # a is still being snapshotted
    c.abandon(a)
    assert c.durable() >= b


def test_bad_keys_and_payloads(tmp_path):
    c = Committer(tmp_path)
    with pytest.raises(CommitError, match="invalid durable key"):
        c.save("pairs", "../etc", {})
    with pytest.raises(CommitError, match="not JSON"):
        c.save("pairs", "x", {"s": {1, 2}})
    s = c.stamp()
    assert c.durable() == s - 1  # the failed commit left no stamp outstanding
    c2 = Committer(tmp_path)
    assert c2.items("pairs") == {}


def test_legacy_records_are_adopted_below_every_stamp(tmp_path):
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "old.json").write_text(json.dumps({"name": "old", "generation": 7}))
    c = Committer(tmp_path)
    assert c.load("pairs", "old") == {"name": "old", "generation": 7}
    assert c.save("pairs", "old", {"name": "old", "generation": 8})


def test_unreadable_record_is_one_line(tmp_path):
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "x.json").write_text("{not json")
    with pytest.raises(CommitError, match=r"x\.json: unreadable durable record"):
        Committer(tmp_path)


def test_one_committer_per_directory_in_a_process(tmp_path):
    """Two committers over one directory would keep two counters: `at` hands out one."""
    a = Committer.at(tmp_path / "state")
    assert Committer.at(str(tmp_path / "state" / ".." / "state")) is a
    assert Committer.at(tmp_path / "other") is not a
