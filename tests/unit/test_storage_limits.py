"""What storage reading may hold: read slots per namespace, per store and in all;
size caps on every file read; bounded caches (storage_limits.py, storage_reader.py)."""

from __future__ import annotations

import json

import pytest
from fsspec.implementations.local import LocalFileSystem

from kubetune_operator import storage_reader
from kubetune_operator.storage_limits import PER_NAMESPACE_ENV, LruCache, ReadSlots


def test_a_namespace_holds_its_share_however_many_stores_it_names():
    slots = ReadSlots(per_namespace=4, per_store=4, total=32)
    held = [slots.take("hostile", f"s3|http://10.0.0.{i}:9000") for i in range(20)]
    admitted = [t for t, _ in held if t is not None]
    assert len(admitted) == 4
    ticket, why = held[4]
    assert ticket is None and "namespace hostile already has 4" in why
    assert PER_NAMESPACE_ENV in why
    # Another namespace is not touched by it.
    ok, _ = slots.take("healthy", "s3|http://s3.example:9000")
    assert ok is not None
    assert slots.in_flight("hostile") == 4 and slots.in_flight() == 5
    # A slot comes back when a read ends, once however often it is released.
    admitted[0].release()
    admitted[0].release()
    assert slots.in_flight("hostile") == 3
    again, _ = slots.take("hostile", "s3|http://10.0.0.99:9000")
    assert again is not None
    assert slots.take("hostile", "s3|http://10.0.0.100:9000")[0] is None


def test_a_store_and_the_operator_have_caps_too_and_nothing_grows():
    slots = ReadSlots(per_namespace=4, per_store=2, total=5)
    a = [slots.take(f"ns{i}", "s3|shared") for i in range(3)]
    assert [t is not None for t, _ in a] == [True, True, False]
    assert "store already has 2" in a[2][1]
    b = [slots.take(f"other{i}", f"s3|own{i}") for i in range(4)]
    assert [t is not None for t, _ in b] == [True, True, True, False]
    assert "all 5 of the operator's storage threads are busy" in b[3][1]
    for ticket, _ in a[:2] + b[:3]:
        ticket.release()
    assert slots.in_flight() == 0
    assert len(slots) == 0  # namespaces and stores with nothing in flight are forgotten


def test_reads_per_namespace_from_the_environment():
    assert ReadSlots.from_env({}).per_namespace == 4
    assert ReadSlots.from_env({PER_NAMESPACE_ENV: "2"}).per_namespace == 2
    for bad in ("0", "33", "four", "-1"):
        with pytest.raises(ValueError, match=f"{PER_NAMESPACE_ENV}=.*from 1 to 32"):
            ReadSlots.from_env({PER_NAMESPACE_ENV: bad})


def test_lru_cache_drops_the_least_recently_used_and_the_idle():
    now = [0.0]
    cache: LruCache[str, int] = LruCache(3, max_idle_seconds=60, clock=lambda: now[0])
    for i, key in enumerate("abc"):
        cache.put(key, i)
    assert cache.get("a") == 0  # a is now the most recently used
    cache.put("d", 3)
    assert "b" not in cache and len(cache) == 3
    assert [cache.get(k) for k in "acd"] == [0, 2, 3]
    now[0] = 30.0
    assert cache.get("d") == 3  # used: stays
    now[0] = 61.0
    assert cache.get("a") is None and "c" not in cache  # idle for over 60 s
    assert len(cache) == 1 and cache.get("d") == 3


def test_storage_reader_caches_are_bounded():
    assert isinstance(storage_reader._fs_cache, LruCache)
    assert storage_reader._fs_cache.max_entries == storage_reader.FS_CACHE_ENTRIES
    assert storage_reader._fs_cache.max_idle_seconds == storage_reader.FS_IDLE_SECONDS
    assert isinstance(storage_reader._manifest_cache, LruCache)
    assert storage_reader._manifest_cache.max_entries == storage_reader.MANIFEST_CACHE_ENTRIES


class _StaleSize(LocalFileSystem):
    """A store whose size answer is older than the file (it grew in between)."""

    def info(self, path, **kwargs):
        return {**super().info(path, **kwargs), "size": 10}


def test_read_capped_checks_the_size_first_and_reads_at_most_cap_plus_one(tmp_path):
    path = tmp_path / "progress.json"
    path.write_bytes(b"x" * 5000)
    fs = LocalFileSystem()
    with pytest.raises(storage_reader.FileTooLarge) as exc:
        storage_reader.read_capped(fs, str(path), 4096)
    assert (exc.value.found.size, exc.value.found.cap) == (5000, 4096)
    assert storage_reader.read_capped(fs, str(path), 5000) == b"x" * 5000
    # Grown past the cap after its size was read: stopped at cap + 1 bytes.
    with pytest.raises(storage_reader.FileTooLarge) as exc:
        storage_reader.read_capped(_StaleSize(), str(path), 4096)
    assert exc.value.found.size == 4097
    (tmp_path / "empty.json").write_bytes(b"")
    assert storage_reader.read_capped(fs, str(tmp_path / "empty.json"), 10) == b""


def test_an_oversized_record_is_named_and_the_rest_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_reader, "RECORD_CAP_BYTES", 64 * 1024)
    prefix = tmp_path / "ns" / "job" / "uid"
    prefix.mkdir(parents=True)
    big = {"phase": "Training", "step": 3, "updatedAt": "x", "pad": "p" * (128 * 1024)}
    (prefix / "progress.json").write_text(json.dumps(big))
    (prefix / "outputs.json").write_text(json.dumps({"adapter": "s3://b/adapter", "steps": 8}))
    (prefix / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 5000))
    )
    snap = storage_reader.read_snapshot(str(prefix), None, {}, schemes=("file",))
    assert snap.progress is None
    assert [(t.path, t.cap) for t in snap.too_large] == [(str(prefix / "progress.json"), 64 * 1024)]
    assert snap.outputs is not None and snap.outputs.adapter == "s3://b/adapter"
    assert snap.metrics[-1].step == 4999 and len(snap.metrics) == 50  # the tail only
    message = storage_reader.too_large_message(snap)
    assert "progress.json is " in message and "over the operator's 65536 bytes cap" in message
    assert "hint:" in message
    big_cap = storage_reader.TooLarge(path="s3://b/p/progress.json", size=50 << 20, cap=1 << 20)
    assert "is 50 MiB, over the operator's 1 MiB cap" in storage_reader.too_large_message(
        storage_reader.StorageSnapshot(prefix="s3://b/p", too_large=[big_cap])
    )


def test_metrics_tail_reads_only_its_tail_bytes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 2.0}) + "\n" for i in range(1, 2000)))
    reads = []

    class Counting(LocalFileSystem):
        def cat_file(self, path, start=None, end=None, **kwargs):
            data = super().cat_file(path, start=start, end=end, **kwargs)
            reads.append(len(data))
            return data

    rows = storage_reader.metrics_tail(Counting(), str(path), limit=10, tail_bytes=1024)
    assert [r.step for r in rows] == list(range(1990, 2000))
    assert reads == [1024]


def test_filesystems_are_one_per_store_and_keys_bounded_on_one_session(monkeypatch):
    monkeypatch.setattr(storage_reader, "_fs_cache", LruCache(2))
    keys = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}

    def fs(port: int, key: str = "k"):
        access = {"endpoint": f"http://127.0.0.1:{port}", "secretRef": {"name": "s"}}
        return storage_reader.filesystem("s3://b/p", access, keys | {"AWS_ACCESS_KEY_ID": key})

    a = fs(1)
    assert fs(1) is a  # reused across polls
    assert fs(1, key="rotated") is not a  # other keys, another filesystem
    b, c = fs(2), fs(3)
    assert len(storage_reader._fs_cache) == 2
    assert fs(1) is not a  # the least recently used was dropped: opened anew
    # One botocore session (S3's service model loaded once); keys stay per client.
    assert a.session is b.session is c.session
    assert (a.key, c.key) == ("k", "k") and fs(9, key="other").key == "other"
