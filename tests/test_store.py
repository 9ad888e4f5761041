"""AdapterStore with real processes: atomic publish under concurrent writers, readers that never
see a partial adapter, once-only generation under the key lock, LRU eviction with pins, key
stability, integrity checks, kill -9 at every step of the publish path and at random times."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from loragen_vllm import envs
from loragen_vllm.errors import (
    AdapterPinned,
    InvalidDescription,
    LockTimeout,
    StoreFull,
    UnknownAdapter,
    to_http,
)
from loragen_vllm.processes import HOST, PID_SPACE
from loragen_vllm.store import AdapterStore, NewAdapter, StoredAdapter
from loragen_vllm.store_meta import META_FILE
from tests.procs import PROCS, key_lock_held_elsewhere

FP = "f" * 64  # a generator fingerprint


def adapter_files(tag: str, size: int = 4096) -> dict[str, bytes]:
    """PEFT-shaped files whose content depends on ``tag`` (to tell writers apart)."""
    block = hashlib.sha256(tag.encode()).digest()
    weights = (block * (size // len(block) + 1))[:size]
    return {
        "adapter_config.json": b'{"r": 8, "lora_alpha": 16, "tag": "%s"}' % tag.encode(),
        "adapter_model.safetensors": weights,
    }


def publish(store: AdapterStore, description: str, tag: str | None = None, size: int = 4096):
    return store.publish(
        adapter_files(tag or description, size),
        description=description,
        fingerprint=FP,
        seed=0,
        generator_kind="t2l",
    )


# ----------------------------------------------------------------------------------------------
# Worker processes


def _publish_worker(root, description, tag, size, start, out):
    store = AdapterStore(root, max_adapters=None, max_bytes=None)
    start.wait()
    got = publish(store, description, tag, size)
    own = hashlib.sha256(adapter_files(tag, size)["adapter_model.safetensors"]).hexdigest()
    stored = (got.path / "adapter_model.safetensors").read_bytes()
    out.put((tag, got.key, got.meta.files["adapter_model.safetensors"].sha256, own,
             hashlib.sha256(stored).hexdigest()))


def _publish_many_worker(root, prefix, n, size, start):
    store = AdapterStore(root, max_adapters=None, max_bytes=None)
    start.wait()
    for i in range(n):
        publish(store, f"{prefix} task {i}", size=size)


def _reader_worker(root, start, stop, out):
    """Watch adapters/ while writers publish; report every folder seen incomplete."""
    store = AdapterStore(root, max_adapters=None, max_bytes=None)
    adapters = Path(root) / "adapters"
    seen, bad = set(), []
    start.wait()
    while not stop.is_set():
        for key in os.listdir(adapters):
            try:
                meta = store.show(key)  # the metadata must already be there, complete
                for name, info in meta.files.items():
                    data = (adapters / key / name).read_bytes()
                    if hashlib.sha256(data).hexdigest() != info.sha256:
                        bad.append((key, name))
            except Exception as e:  # noqa: BLE001 -- any failure to read is a finding
                bad.append((key, repr(e)))
            seen.add(key)
    out.put((len(seen), bad))


def _once_worker(root, description, start, log, out):
    """What the plugin and `loragen-vllm generate` do: get_or_create (lock, look up, generate
    only on a miss, publish). Reports when it asked and when it got the adapter."""
    store = AdapterStore(root, max_adapters=None, max_bytes=None)
    key = store.key(description, FP, 0)

    def generate() -> NewAdapter:
        t0 = time.time()
        time.sleep(0.5)  # generation takes a while
        with open(log, "a") as f:  # one line per generation: pid, start, end
            f.write(f"{os.getpid()} {t0} {time.time()}\n")
        return NewAdapter(adapter_files(description), description, FP, 0, "t2l")

    start.wait()
    asked = time.time()
    stored, generated = store.get_or_create(key, generate, pin=True)
    assert stored.key == key and os.getpid() in [p.pid for p in store.pins(key)]
    out.put((os.getpid(), asked, time.time(), generated))


def _key_in_subprocess(description: str, fingerprint: str, seed: int) -> str:
    code = (
        "import sys; from loragen_vllm.store import AdapterStore; "
        "print(AdapterStore.key(sys.argv[1], sys.argv[2], int(sys.argv[3])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, description, fingerprint, str(seed)],
        capture_output=True, text=True, check=True,
    )
    return out.stdout.strip()


def _run_all(procs):
    for p in procs:
        p.start()
    return procs


def _join_all(procs, timeout=60):
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, f"worker {p.name} exited with {p.exitcode}"


# ----------------------------------------------------------------------------------------------
# Keys


def test_key_stable_across_processes_and_sensitive_to_each_input():
    k = AdapterStore.key("Classify the sentiment of a movie review.", FP, 0)
    # The key is the sha256 of the versioned (normalised description, fingerprint, seed) record:
    # 64 lowercase hex digits, a usable folder name, and nothing of the description in it.
    assert re.fullmatch(r"[0-9a-f]{64}", k)
    payload = msgspec.json.encode(["loragen-vllm adapter key v1", "Classify the sentiment of a movie review.", FP, "0"])
    assert k == hashlib.sha256(payload).hexdigest()
    assert _key_in_subprocess("Classify the sentiment of a movie review.", FP, 0) == k
    # Regression pin of the key format: changing it orphans every existing store.
    assert AdapterStore.key("hello", "fp", 0) == (
        "99f615052a8e94b388ead699653c9fe5782065856e44f2e61e2885e24c9bab4b"
    )
    others = {
        AdapterStore.key("Classify the sentiment of a movie review!", FP, 0),
        AdapterStore.key("Classify the sentiment of a movie review.", "e" * 64, 0),
        AdapterStore.key("Classify the sentiment of a movie review.", FP, 1),
    }
    assert k not in others and len(others) == 3


def test_normalisation_equivalent_descriptions_share_a_key():
    nfc = AdapterStore.key("Résumé  the\ttext.", FP, 0)
    assert AdapterStore.key("  Re\u0301sume\u0301 the \n text. ", FP, 0) == nfc
    assert _key_in_subprocess("Re\u0301sume\u0301 the text.", FP, 0) == nfc
    with pytest.raises(InvalidDescription, match="empty"):
        AdapterStore.key("", FP, 0)
    with pytest.raises(TypeError):
        AdapterStore.key("x", FP, True)


# ----------------------------------------------------------------------------------------------
# Atomic publish with concurrent processes


def test_concurrent_writers_same_key_exactly_one_winner(tmp_path):
    n, size = 6, 1 << 20  # 1 MiB files widen the race window
    start, out = PROCS.Barrier(n), PROCS.Queue()  # all start writing together
    procs = _run_all([
        PROCS.Process(target=_publish_worker,
                      args=(str(tmp_path), "One shared task.", f"writer{i}", size, start, out))
        for i in range(n)
    ])
    results = [out.get(timeout=20) for _ in range(n)]
    _join_all(procs)

    keys = {r[1] for r in results}
    returned = {r[2] for r in results}
    assert len(keys) == 1 and len(returned) == 1  # everyone got the same adapter
    winners = [r[0] for r in results if r[3] == r[2]]
    assert len(winners) == 1, winners
    assert all(r[4] == r[2] for r in results)  # and its bytes on disk are intact
    store = AdapterStore(tmp_path, max_adapters=None, max_bytes=None)
    assert store.keys() == list(keys)
    assert store.get(keys.pop()) is not None
    assert os.listdir(tmp_path / "tmp") == []  # losers cleaned up after themselves


def test_concurrent_writers_different_keys_and_readers_see_whole_adapters(tmp_path):
    start, stop, out = PROCS.Barrier(4), PROCS.Event(), PROCS.Queue()  # 3 writers + reader
    AdapterStore(tmp_path)  # create the layout before the reader looks
    reader = PROCS.Process(target=_reader_worker, args=(str(tmp_path), start, stop, out))
    reader.start()
    writers = _run_all([
        PROCS.Process(target=_publish_many_worker, args=(str(tmp_path), f"w{i}", 6, 2 << 20, start))
        for i in range(3)
    ])
    _join_all(writers)
    stop.set()
    seen, bad = out.get(timeout=60)
    _join_all([reader])

    assert bad == []
    assert seen > 0  # the reader did look at published adapters
    store = AdapterStore(tmp_path, max_adapters=None, max_bytes=None)
    assert len(store.keys()) == 18
    for i in range(3):
        for j in range(6):
            got = store.get(store.key(f"w{i} task {j}", FP, 0))
            assert got is not None
            assert (got.path / "adapter_model.safetensors").read_bytes() == adapter_files(
                f"w{i} task {j}", 2 << 20)["adapter_model.safetensors"]
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "quarantine") == []


def test_get_or_create_makes_cross_process_generation_happen_once(tmp_path):
    start, log, out = PROCS.Barrier(4), tmp_path / "generations.log", PROCS.Queue()
    procs = _run_all([
        PROCS.Process(target=_once_worker,
                      args=(str(tmp_path / "s"), "Once only.", start, str(log), out))
        for _ in range(4)
    ])
    _join_all(procs)
    [line] = log.read_text().splitlines()  # one generation
    maker, _gen_start, gen_end = int(line.split()[0]), *map(float, line.split()[1:])
    reports = [out.get(timeout=10) for _ in range(4)]
    assert [pid for pid, *_ in reports if _[-1]] == [maker]
    # They overlapped: all four asked before the one generation ended, and the other three
    # waited for it (got the adapter only after it was made). Serialised callers would not.
    assert all(asked < gen_end for _, asked, _, _ in reports)
    assert all(got >= gen_end for pid, _, got, _ in reports if pid != maker)


def test_get_or_create_publishes_once_and_publishes_nothing_when_generation_fails(tmp_path):
    store = AdapterStore(tmp_path)
    key = store.key("Made on demand.", FP, 0)

    def broken() -> NewAdapter:
        raise RuntimeError("generator down")

    with pytest.raises(RuntimeError, match="generator down"):
        store.get_or_create(key, broken)
    assert store.keys() == []
    new = NewAdapter(adapter_files("made"), "Made on demand.", FP, 0, "t2l")
    made, generated = store.get_or_create(key, lambda: new)
    assert generated and made.key == key and store.get(key, record_hit=False) is not None
    again, generated = store.get_or_create(key, broken)  # a hit: nothing is generated
    assert not generated and again.path == made.path and again.meta.hits == 1
    assert store.pins(key) == []  # pinned only when asked


def test_publish_existing_key_is_a_noop_returning_the_existing_one(tmp_path):
    store = AdapterStore(tmp_path)
    first = publish(store, "Same task.", tag="first")
    again = publish(store, "  Same   task. ", tag="second")
    assert again.key == first.key and again.meta.created == first.meta.created
    assert (again.path / "adapter_model.safetensors").read_bytes() == adapter_files(
        "first")["adapter_model.safetensors"]


def test_publish_rejects_bad_file_names(tmp_path):
    store = AdapterStore(tmp_path)
    for files in ({"../x": b"", "adapter_config.json": b"{}"},
                  {META_FILE: b"", "adapter_config.json": b"{}"},
                  {"weights.safetensors": b"x"}):
        with pytest.raises(ValueError):
            store.publish(files, description="x", fingerprint=FP, seed=0, generator_kind="t2l")
    assert store.keys() == []


# ----------------------------------------------------------------------------------------------
# Integrity


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra", "meta", "unreadable", "unreadable_meta"])
def test_corrupt_adapter_is_detected_quarantined_and_can_be_republished(tmp_path, damage):
    store = AdapterStore(tmp_path)
    a = publish(store, "Fragile task.")
    weights = a.path / "adapter_model.safetensors"
    if damage.startswith("unreadable"):  # a file that cannot be read (IsADirectoryError, as EACCES or EIO)
        target = a.path / META_FILE if damage == "unreadable_meta" else weights
        target.unlink()
        target.mkdir()
        listed = [] if damage == "unreadable_meta" else [a.key]  # ls reads the metadata alone
        assert [m.key for m in store.ls()] == listed and store.gc().count == 1  # counted by gc, no crash
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    elif damage == "extra":
        (a.path / "adapter_model.bin").write_bytes(b"surprise")
    else:
        (a.path / META_FILE).write_bytes(b'{"key": ')

    assert store.get(a.key) is None
    assert not a.path.exists() and len(os.listdir(tmp_path / "quarantine")) == 1
    again = publish(store, "Fragile task.")
    assert again.key == a.key and store.get(a.key) is not None


@pytest.mark.parametrize("change", ["flip", "rewrite_same", "touch", "extra", "replaced", "removed"])
def test_unchanged_sees_any_write_to_a_verified_folder(tmp_path, change):
    """`unchanged` (stat only) is True while nothing touched the folder, for the published and
    the looked-up adapter alike, and False after any write -- also one that keeps the size, or
    even the bytes."""
    store = AdapterStore(tmp_path, max_adapters=None, max_bytes=None)
    published = publish(store, "Watched task.")
    looked_up = store.get(published.key)
    assert store.drain(10)  # fsync of the background settler writes no file times
    assert store.unchanged(published) and store.unchanged(looked_up)
    (published.path / "adapter_model.safetensors").read_bytes()  # reading is not a change
    assert store.unchanged(looked_up)
    weights = published.path / "adapter_model.safetensors"
    data = weights.read_bytes()
    if change == "flip":
        flipped = bytearray(data)
        flipped[10] ^= 1
        weights.write_bytes(bytes(flipped))
    elif change == "rewrite_same":
        weights.write_bytes(data)
    elif change == "touch":
        os.utime(weights)
    elif change == "extra":
        (published.path / "notes.txt").write_bytes(b"x")
    elif change == "replaced":  # removed and published again: another folder, same bytes
        store.rm(published.key, force=True)
        publish(store, "Watched task.")
    else:
        store.rm(published.key, force=True)
    assert not store.unchanged(published) and not store.unchanged(looked_up)
    if change in ("rewrite_same", "touch", "replaced"):  # the content still verifies
        again = store.get(published.key)
        assert again is not None and store.unchanged(again)


BIG = 1_900_000  # bytes of weights: the shipped generator's adapters (r 8, q+v, 30 layers)


def _expect_whole_adapters_only(root: Path) -> list[str]:
    """Every folder in adapters/ is a whole adapter (its sha256s hold); returns their keys."""
    store = AdapterStore(root, max_adapters=None, max_bytes=None)
    keys = store.keys()
    for key in keys:
        meta = store.show(key)
        assert store.get(key, record_hit=False) is not None, f"{key[:12]} is partial or corrupt"
        data = (store.path(key) / "adapter_model.safetensors").read_bytes()
        size = meta.files["adapter_model.safetensors"].size
        assert data == adapter_files(meta.description, size)["adapter_model.safetensors"]
    assert os.listdir(root / "quarantine") == []
    return keys


def _get_or_create_correct(root: Path, description: str) -> tuple[StoredAdapter, bool]:
    """What the next server does: get_or_create; the adapter's bytes are the generator's."""
    store = AdapterStore(root, max_adapters=None, max_bytes=None)
    stored, generated = store.get_or_create(
        store.key(description, FP, 0), lambda: NewAdapter(adapter_files(description, BIG), description, FP, 0, "t2l")
    )
    assert (stored.path / "adapter_model.safetensors").read_bytes() == adapter_files(description, BIG)[
        "adapter_model.safetensors"]
    assert store.drain(10)
    return stored, generated


def _publish_and_die_after(root, description, sync, step):
    """Publish (as get_or_create does), and kill -9 this process right after ``step`` ends."""
    store = AdapterStore(root, max_adapters=5, max_bytes=None, sync=sync)

    def timer(name: str, seconds: float) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    store.step_timer = timer
    store.get_or_create(store.key(description, FP, 0),
                        lambda: NewAdapter(adapter_files(description, BIG), description, FP, 0, "t2l"), pin=True)
    store.drain()
    os._exit(3)  # the step never ran: the test fails on this exit code


@pytest.mark.parametrize("sync", ["background", "inline"])
@pytest.mark.parametrize("step", ["lock", "pin", "lookup", "check", "hash", "write", "rename", "usage", "fsync", "gc"])
def test_kill_9_after_any_step_of_a_publish_leaves_no_partial_adapter(tmp_path, sync, step):
    """A process killed with SIGKILL right after each step of the publish path (foreground or
    background) leaves nothing partial visible, and the next get_or_create serves or makes the
    right adapter; the dead publisher's leftovers go with the next gc."""
    root = tmp_path / "store"
    store = AdapterStore(root, max_adapters=5, max_bytes=None)
    for i in range(6):  # a full store: gc has work after the publish
        publish(store, f"old task {i}", size=100)
    assert store.drain(10)
    proc = PROCS.Process(target=_publish_and_die_after, args=(str(root), "Doomed task.", sync, step))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    keys = _expect_whole_adapters_only(root)
    published = store.key("Doomed task.", FP, 0) in keys
    assert published == (step in ("rename", "usage", "fsync", "gc"))
    _, generated = _get_or_create_correct(root, "Doomed task.")
    assert generated != published
    store.gc()
    assert os.listdir(root / "tmp") == []


def _publish_forever(root, sync):
    store = AdapterStore(root, max_adapters=None, max_bytes=None, sync=sync)
    i = 0
    while True:
        description = f"task {os.getpid()}-{i}"
        store.get_or_create(store.key(description, FP, 0),
                            lambda d=description: NewAdapter(adapter_files(d, BIG), d, FP, 0, "t2l"), pin=True)
        i += 1


def test_kill_9_at_random_times_never_leaves_a_partial_adapter(tmp_path):
    """A publisher killed at 30 random moments (mid-write, mid-rename, mid-fsync, ...): every
    folder in adapters/ verifies after each kill, and a store opened afterwards serves them."""
    import random

    root = tmp_path / "store"
    AdapterStore(root)
    rng = random.Random(0)
    kills = 0
    for round_ in range(30):
        proc = PROCS.Process(target=_publish_forever, args=(str(root), ("background", "inline")[round_ % 2]))
        proc.start()
        time.sleep(0.05 + rng.random() * 0.1)  # a few publishes, then kill -9 at some point of one
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        kills += proc.exitcode == -signal.SIGKILL
        _expect_whole_adapters_only(root)
    assert kills == 30
    assert len(AdapterStore(root).keys()) >= 30  # they did publish between the kills
    AdapterStore(root).gc()
    assert os.listdir(root / "tmp") == []  # every dead publisher's unfinished folder is gone


@pytest.mark.parametrize("lost", ["empty files", "no metadata", "zeroed weights", "empty folder"])
def test_what_a_power_loss_before_the_fsync_can_leave_is_caught_and_regenerated(tmp_path, lost):
    """The fsync runs after the response, so a power loss may leave a published folder whose
    data never reached the disk. Each such state fails the sha256 check: quarantined, never
    served, and the same adapter is made again."""
    root = tmp_path / "store"
    stored, generated = _get_or_create_correct(root, "Fragile task.")
    assert generated
    for f in stored.path.iterdir():
        if lost == "empty files":
            f.write_bytes(b"")
        elif lost == "no metadata" and f.name == META_FILE:
            f.unlink()
        elif lost == "zeroed weights" and f.name == "adapter_model.safetensors":
            f.write_bytes(bytes(f.stat().st_size))
        elif lost == "empty folder":
            f.unlink()
    again, generated = _get_or_create_correct(root, "Fragile task.")
    assert generated and again.key == stored.key
    assert len(os.listdir(root / "quarantine")) == 1


@pytest.mark.parametrize("sync", ["background", "inline"])
def test_fsync_and_gc_run_after_the_publish_returns_or_before_it_inline(tmp_path, sync):
    """Background: the response path has no fsync and no gc (they run in the store's thread,
    after it); inline: both run before publish returns. Either way the settled files are the
    bytes published, and the limits hold."""
    store = AdapterStore(tmp_path, max_adapters=2, max_bytes=None, sync=sync)
    main = threading.get_ident()
    where: dict[str, set[str]] = {}
    store.step_timer = lambda step, s: where.setdefault(step, set()).add(
        "caller" if threading.get_ident() == main else "background")
    stored = [publish(store, f"task {i}", size=BIG) for i in range(4)]
    assert store.drain(10)
    off_path = "background" if sync == "background" else "caller"
    assert where["write"] == where["rename"] == {"caller"}
    assert where["fsync"] == where["gc"] == {off_path}
    assert len(store.keys()) == 2 and stored[-1].key in set(store.keys())
    for s in stored[-1:]:
        assert (s.path / "adapter_model.safetensors").read_bytes() == adapter_files(f"task {len(stored) - 1}", BIG)[
            "adapter_model.safetensors"]


def _publish_and_exit(root):
    publish(AdapterStore(root, max_adapters=1, max_bytes=None), "the newest task")  # no drain: exit does it


def test_a_process_that_exits_right_after_publishing_still_settles(tmp_path):
    """``loragen-vllm generate`` publishes and exits: the store's work after the publish (gc
    here) is done at exit, not lost with the background thread."""
    old = publish(AdapterStore(tmp_path, max_adapters=None, max_bytes=None), "an old task")
    time.sleep(0.02)
    code = "import sys; from tests.test_store import _publish_and_exit; _publish_and_exit(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1], check=False)
    assert done.returncode == 0, done.stderr
    keys = AdapterStore(tmp_path, max_adapters=None, max_bytes=None).keys()
    assert keys == [AdapterStore.key("the newest task", FP, 0)] and old.key not in keys


def test_store_sync_setting(monkeypatch):
    monkeypatch.setenv("LORAGEN_STORE_SYNC", "INLINE")
    assert envs.LORAGEN_STORE_SYNC == "inline"
    monkeypatch.setenv("LORAGEN_STORE_SYNC", "later")
    with pytest.raises(envs.InvalidSetting, match="LORAGEN_STORE_SYNC must be one of background, inline"):
        _ = envs.LORAGEN_STORE_SYNC
    with pytest.raises(ValueError, match="sync must be one of"):
        AdapterStore("/nonexistent-never-created", sync="later")


# ----------------------------------------------------------------------------------------------
# Usage, eviction and pins


def _age(store: AdapterStore, order: list[str]) -> None:
    """Use adapters in ``order`` (oldest first), far enough apart for coarse file times."""
    for key in order:
        time.sleep(0.02)
        assert store.get(key) is not None


def test_hits_and_last_used_persist_across_instances(tmp_path):
    store = AdapterStore(tmp_path)
    a = publish(store, "Counted task.")
    assert a.meta.hits == 0
    for _ in range(3):
        store.get(a.key)
    meta = AdapterStore(tmp_path).show(a.key)  # a "restarted" process
    assert meta.hits == 3 and meta.last_used >= a.meta.created


def test_eviction_by_count_follows_lru(tmp_path):
    store = AdapterStore(tmp_path, max_adapters=None, max_bytes=None)
    keys = [publish(store, f"task {i}").key for i in range(5)]
    _age(store, [keys[3], keys[0], keys[4], keys[1], keys[2]])
    store.max_adapters = 2
    report = store.gc()
    assert report.evicted == [keys[3], keys[0], keys[4]]
    assert sorted(store.keys()) == sorted([keys[1], keys[2]])
    assert report.count == 2 and not report.over_limit


def test_eviction_by_bytes_follows_lru(tmp_path):
    store = AdapterStore(tmp_path, max_adapters=None, max_bytes=None)
    keys = [publish(store, f"task {i}", size=10_000).key for i in range(4)]
    _age(store, [keys[2], keys[3], keys[0], keys[1]])
    size = store.show(keys[0]).size
    store.max_bytes = 2 * size + size // 2
    report = store.gc()
    assert report.evicted == [keys[2], keys[3]]
    assert report.bytes == 2 * size and report.freed_bytes == 2 * size


def test_publish_runs_gc_and_keeps_the_newest(tmp_path):
    store = AdapterStore(tmp_path, max_adapters=3, max_bytes=None)
    keys = []
    for i in range(5):
        keys.append(publish(store, f"task {i}").key)
        assert store.drain(10)  # gc runs after the publish, in the store's background thread
        time.sleep(0.02)
    assert sorted(store.keys()) == sorted(keys[2:])


def test_background_gc_spares_adapters_published_while_it_ran(tmp_path):
    """Publishes in a burst (no pause for the background passes, times within the kernel's
    coarse clock tick): the newest adapters stay, the oldest go, the limit holds."""
    store = AdapterStore(tmp_path, max_adapters=2, max_bytes=None)
    keys = [publish(store, f"burst {i}").key for i in range(6)]
    assert store.drain(10)
    assert sorted(store.keys()) == sorted(keys[-2:])


def test_gc_between_a_publishs_rename_and_its_usage_log_spares_the_new_adapter(tmp_path):
    """A gc that runs after a publish has renamed its folder into place and before it has written
    the usage log (the background settler of an earlier publish can): the new adapter's folder
    mtime comes from the kernel's coarse clock and can fall before its elder siblings' nanosecond
    usage stamps; the gc must still evict the least recently used, not the newest."""
    store = AdapterStore(tmp_path, max_adapters=None, max_bytes=None, sync="inline")
    old, mid = publish(store, "old").key, publish(store, "mid").key
    new = publish(store, "new").key
    os.unlink(tmp_path / "usage" / new)  # as between the rename and the usage log
    coarse = os.stat(tmp_path / "usage" / old).st_mtime_ns - 1_000_000  # a tick before the eldest's stamp
    os.utime(store.path(new), ns=(coarse, coarse))
    store.max_adapters = 2
    assert store.gc().evicted == [old]
    assert sorted(store.keys()) == sorted([mid, new])


def _pin_holder_worker(root, key, lease_s, ready):
    """A "server process": pins ``key`` with its own store (which renews its pins), then lives."""
    store = AdapterStore(root, max_adapters=None, max_bytes=None, pin_lease_s=lease_s)
    store.pin(key)
    ready.set()
    time.sleep(120)


def test_pins_are_leases_live_holders_renew_dead_ones_expire(tmp_path):
    lease = 1.0
    store = AdapterStore(tmp_path, max_adapters=None, max_bytes=None, pin_lease_s=lease)
    keys = [publish(store, f"task {i}").key for i in range(4)]
    _age(store, keys)  # keys[0] least recently used
    ready = [PROCS.Event() for _ in range(3)]
    live, dead, stopped = (
        PROCS.Process(target=_pin_holder_worker, args=(str(tmp_path), keys[i], lease, ready[i]), daemon=True)
        for i in range(3)
    )
    try:
        for p, r in zip((live, dead, stopped), ready):
            p.start()
            assert r.wait(30)
        assert [p.pid for p in store.pins(keys[0])] == [live.pid]
        assert [p.pid for p in store.pins(keys[1])] == [dead.pid]
        dead.kill()  # kill -9: nothing unpins
        dead.join()
        os.kill(stopped.pid, signal.SIGSTOP)  # alive but stopped: renews nothing
        store.max_adapters = 2
        assert store.gc().evicted == [keys[3]]  # every other adapter is pinned, leases fresh
        time.sleep(3 * lease)  # several renewals of the live holder; the others' leases end
        assert [p.pid for p in store.pins(keys[0])] == [live.pid]  # renewed, still counts
        assert store.pins(keys[1]) == [] and store.pins(keys[2]) == []
        report = store.gc()
        assert report.evicted == [keys[1]]  # least recently used after the pinned keys[0]
        assert sorted(store.keys()) == sorted([keys[0], keys[2]]) and report.pinned == 1
        assert not (tmp_path / "pins" / keys[1]).exists()  # the expired pin was cleaned up
        store.max_adapters = 0
        report = store.gc()
        assert report.evicted == [keys[2]] and store.keys() == [keys[0]]
        assert report.over_limit and report.pinned == 1
        with pytest.raises(AdapterPinned, match="pinned"):
            store.rm(keys[0])
        live.kill()
        live.join()
        time.sleep(1.5 * lease)
        assert store.gc().evicted == [keys[0]] and store.keys() == []
    finally:
        for p in (live, dead, stopped):
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.join()


def test_a_pin_for_another_process_lasts_one_lease(tmp_path):
    store = AdapterStore(tmp_path, max_adapters=None, max_bytes=None, pin_lease_s=0.5)
    key = publish(store, "Leased task.").key
    store.pin(key, holder=12345)  # nobody renews it
    assert [p.pid for p in store.pins(key)] == [12345]
    time.sleep(0.8)
    assert store.pins(key) == []
    store.unpin(key, holder=12345)


def test_rm_force_and_unknown_keys(tmp_path):
    store = AdapterStore(tmp_path)
    a = publish(store, "Removable task.")
    store.pin(a.key)  # this (live) process
    with pytest.raises(AdapterPinned):
        store.rm(a.key)
    assert store.rm(a.key, force=True) and store.keys() == []
    assert store.rm(a.key) is False
    with pytest.raises(UnknownAdapter):
        store.get("../../etc/passwd")
    with pytest.raises(UnknownAdapter):
        store.resolve_key(a.key[:8])


def test_resolve_key_prefix(tmp_path):
    store = AdapterStore(tmp_path)
    a = publish(store, "Prefixed task.")
    assert store.resolve_key(a.key[:6].upper()) == a.key
    with pytest.raises(UnknownAdapter, match="4-64 hex"):
        store.resolve_key("xyz")


def test_gc_removes_unfinished_publishes_of_dead_processes(tmp_path):
    store = AdapterStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "tmp" / f"{'a' * 64}.{PID_SPACE}.{dead.pid}.0000").mkdir()
    (tmp_path / "tmp" / f"{'b' * 64}.{PID_SPACE}.{os.getpid()}.0000").mkdir()  # alive: kept
    # another machine or container of this host name, whose pids we cannot check: kept (until stale)
    (tmp_path / "tmp" / f"{'c' * 64}.{HOST}-otherboot-4026531836.{dead.pid}.0000").mkdir()
    store.gc()
    assert sorted(os.listdir(tmp_path / "tmp")) == [f"{'b' * 64}.{PID_SPACE}.{os.getpid()}.0000",
                                                    f"{'c' * 64}.{HOST}-otherboot-4026531836.{dead.pid}.0000"]


# ----------------------------------------------------------------------------------------------
# Bounded waits and a full disk


def _try_key_lock(root, key, out):
    try:
        with AdapterStore(root, lock_timeout_s=2).key_lock(key):
            out.put("locked")
    except TimeoutError as e:
        out.put(f"timeout: {e}")


def test_a_key_lock_released_is_free_even_while_a_child_forked_under_it_lives(tmp_path):
    """flock belongs to the open file: a child forked while a thread held a key's lock shares it;
    the lock is unlocked, not only closed, on release, so other processes get it at once."""
    store = AdapterStore(tmp_path)
    key = AdapterStore.key("Some task.", FP, 0)
    with store.key_lock(key):
        child = os.fork()
        if child == 0:  # the child keeps the inherited descriptor open for a while
            time.sleep(20)
            os._exit(0)
    try:
        out = PROCS.Queue()
        proc = PROCS.Process(target=_try_key_lock, args=(str(tmp_path), key, out))
        proc.start()
        proc.join(30)
        assert out.get(timeout=5) == "locked"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_gc_removes_pins_half_written_by_a_killed_process(tmp_path):
    """A pin() killed between writing its temporary file and renaming it leaves a dot file; gc
    removes it once it is a lease old, and the key's pin folder with it."""
    store = AdapterStore(tmp_path, pin_lease_s=1.0)
    key = publish(store, "Pinned task.").key
    leftover = tmp_path / "pins" / key / f".123@{HOST}.abcd1234"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"{}")
    store.gc()
    assert leftover.exists()  # younger than a lease: maybe a pin being written now
    old = time.time() - 5
    os.utime(leftover, (old, old))
    store.gc()
    assert not leftover.exists() and not leftover.parent.exists()


def test_a_key_lock_held_by_a_stopped_process_is_a_503_within_the_deadline(tmp_path):
    store = AdapterStore(tmp_path, max_adapters=None, max_bytes=None, lock_timeout_s=0.5)
    keys: dict[str, str] = {}
    i = 0
    while len({k[:3] for k in keys.values()}) != 1 or len(keys) < 2:  # two keys of one old stripe
        k = AdapterStore.key(f"task {i}", FP, 0)
        i += 1
        if not keys or k[:3] == next(iter(keys.values()))[:3]:
            keys[f"task {i - 1}"] = k
    (held_desc, held), (other_desc, other) = list(keys.items())[:2]
    made = []

    def make(desc):
        return lambda: made.append(desc) or NewAdapter(adapter_files(desc), desc, FP, 0, "t2l")

    with key_lock_held_elsewhere(tmp_path, held) as holder:
        os.kill(holder.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as busy:
            store.get_or_create(held, make(held_desc), pin=True, deadline=time.monotonic() + 1.0)
        waited = time.monotonic() - t0
        assert 0.9 <= waited < 3.0 and made == []
        status, body = to_http(busy.value)
        assert status == 503 and "locked by another" in body["error"]["message"]
        assert "retry after" in body["error"]["message"]
        # A key that shared the held key's old lock stripe (first 3 hex digits) does not wait.
        t0 = time.monotonic()
        stored, generated = store.get_or_create(other, make(other_desc), pin=True)
        assert generated and stored.key == other and time.monotonic() - t0 < 0.5
        with pytest.raises(LockTimeout):  # pins wait at most the store's lock deadline
            store.pin(held)
    stored, generated = store.get_or_create(held, make(held_desc))  # the holder died: free again
    assert generated and made == [other_desc, held_desc]


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_serves_stored_adapters_refuses_new_ones_and_gc_frees_space(small_fs):
    store = AdapterStore(small_fs, max_adapters=None, max_bytes=None)
    stored = [publish(store, f"task {i}", size=200_000) for i in range(4)]
    store.pin(stored[0].key)
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
                f.flush()
        except OSError:
            pass
    with pytest.raises(OSError):
        (small_fs / "probe").write_bytes(b"x" * 4096)
    # Lookups need no write: every stored adapter is still served, pins and hits are skipped.
    for s in stored:
        hit, generated = store.get_or_create(s.key, lambda: pytest.fail("generated"), pin=True)
        assert not generated and hit.key == s.key
    for s in stored[1:]:
        store.unpin(s.key)  # served and forgotten again (unpinning needs no space)
    # A new adapter is a clear 503, and the attempt's gc freed room (LRU, pins respected).
    with pytest.raises(StoreFull) as full:
        publish(store, "a new task", size=200_000)
    status, body = to_http(full.value)
    assert status == 503 and "no space left" in body["error"]["message"]
    assert stored[0].key in set(store.keys())  # pinned: kept
    assert stored[1].key not in set(store.keys())  # least recently used unpinned one: evicted
    again = publish(store, "a new task", size=200_000)  # the space gc freed takes it
    assert store.get(again.key) is not None


def _count_under_lock(root, key, n, counter, start):
    store = AdapterStore(root, max_adapters=None, max_bytes=None)
    start.wait()
    for _ in range(n):
        with store.key_lock(key, timeout=30):
            value = int(Path(counter).read_text())  # read, then write: a race loses updates
            time.sleep(0.001)
            Path(counter).write_text(str(value + 1))


def _gc_loop(root, stop):
    store = AdapterStore(root, max_adapters=None, max_bytes=None)
    while not stop.is_set():
        store.gc()


def test_gc_removes_unused_lock_files_without_breaking_mutual_exclusion(tmp_path):
    store = AdapterStore(tmp_path, max_adapters=None, max_bytes=None)
    kept = publish(store, "Kept task.").key
    unused = [AdapterStore.key(f"never stored {i}", FP, 0) for i in range(20)]
    for key in unused:
        with store.key_lock(key):
            pass
    assert len(os.listdir(tmp_path / "locks")) >= 21
    store.gc()
    assert sorted(os.listdir(tmp_path / "locks")) == sorted([f"{kept}.lock", "store.lock"])
    # Counting under one key's lock from three processes while gc keeps removing that unused
    # key's lock file: no update is lost.
    key, counter = unused[0], tmp_path / "counter"
    counter.write_text("0")
    start, stop = PROCS.Barrier(3), PROCS.Event()
    gc = PROCS.Process(target=_gc_loop, args=(str(tmp_path), stop))
    gc.start()
    workers = _run_all([
        PROCS.Process(target=_count_under_lock, args=(str(tmp_path), key, 200, str(counter), start))
        for _ in range(3)
    ])
    try:
        _join_all(workers, timeout=120)
    finally:
        stop.set()
        gc.join(30)
    assert int(counter.read_text()) == 600
