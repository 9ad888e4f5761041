"""The fault and soak run, phase by phase, against real `loragen-vllm serve` processes.

One store (on a tmpfs of its own when it can be mounted) and one copy of the generator
checkpoint serve every phase; the server is started, killed with SIGKILL and started again:

1. ``warmup`` + ``mixed``: stored descriptions, new ones and the base model from a few clients.
2. ``disconnect``: a client hangs up mid-generation; the same description must then work.
3. ``corrupt_resolved``: the safetensors header of an adapter vLLM still remembers is broken on
   disk, ~40 new descriptions push it out of vLLM's CPU LoRA cache, then it is asked again.
4. ``kill9``: SIGKILL of the server's process group with new descriptions in flight. While it is
   down three stored adapters are corrupted (truncated, bytes flipped, metadata removed) and the
   generator checkpoint's weights are cut in half; then it is started again.
5. ``generator_broken``: stored adapters must be 200, new ones a 503 within the deadline; the
   weights are put back and, without a restart, new and corrupted ones must be 200 again.
6. ``disk_full``: the store's file system filled; stored adapters 200, new ones 503;
   `loragen-vllm store gc` with a lower count frees room, then the filler is deleted.
7. ``after_faults``: mixed load again; then ``soak``: distinct new descriptions from several
   clients (the generator batches them) up to a count or a time limit, RSS and table sizes
   sampled throughout.
8. ``ray_actor_kill``: the generator moves into a Ray actor (a one-node cluster on loopback,
   ``loragen-vllm generator start``) and the server restarts with ``--ray-address`` on the same
   store; clients send new descriptions and the actor's process is killed with SIGKILL among
   them; Ray restarts it and re-sends the calls in flight. Then ``lost_check`` (`ledger`), through
   that server.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.faults import injectors
from benchmarks.faults.client import Answer, Stats, chat, disconnect_mid_generation, parse_adapter_header
from benchmarks.faults.ledger import Ledger, verify_store
from benchmarks.faults.sampling import Sampler
from benchmarks.ray_hop import start_ray_head, stop_ray_head
from benchmarks.serving import server as srv

REPO = Path(__file__).resolve().parents[2]
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # as the head runs (ray_hop)
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHECKPOINT = REPO / "generator/checkpoints/default"


@dataclass
class Run:
    """State shared by the phases: the server, what clients saw, what was sampled."""

    a: argparse.Namespace
    store: Path
    ckpt: Path
    logdir: Path
    t0: float = field(default_factory=time.time)
    server: srv.Server | None = None
    phase: str = "start"
    events: list[tuple[str, float]] = field(default_factory=list)
    faults: dict = field(default_factory=dict)
    soak_done: int = 0  # soak descriptions answered (200)
    soak_failed: int = 0
    killed_at: float = 0.0  # time.time() of the kill -9
    ray_head: subprocess.Popen | None = None  # the Ray cluster of phase ray_actor_kill
    ray_address: str | None = None
    new_i: int = 0
    ledger_used: list[str] = field(default_factory=list)  # descriptions a fault phase already asked after the restart
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.stats = Stats(self.a.deadline_s)
        self.ledger = Ledger(self.store)
        self.sampler = Sampler(self.store, self.t0, self.a.sample_s,
                               server_pid=lambda: self.server.process.pid if self.server and self.server.process else None,
                               url=lambda: self.server.url if self.server else None,
                               phase=lambda: self.phase, soak_done=lambda: self.soak_done)

    # -- helpers -------------------------------------------------------------------------------

    def now(self) -> float:
        return round(time.time() - self.t0, 1)

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.events.append((phase, self.now()))
        print(f"[{self.now():7.1f}s] phase {phase}", flush=True)

    def ask(self, model: str, kind: str, max_tokens: int = 8) -> Answer:
        """One request, tallied; a 200 for a description goes into the ledger."""
        assert self.server is not None
        a = chat(self.server.url, model, self.a.deadline_s, max_tokens)
        self.stats.add(self.phase, kind, a)
        if model != BASE:
            self.ledger.record(model, self.phase, a)
        return a

    def new_description(self) -> str:
        with self.lock:
            self.new_i += 1
            return f"Reply with the number {self.new_i} spelled out."

    def start_server(self, name: str) -> None:
        """`loragen-vllm serve` on the store: the generator in-process, or (once phase
        ray_actor_kill set `ray_address`) in the Ray actor, with the local checkpoint copy giving
        its fingerprint."""
        cmd = srv.loragen_serve_prefix() + ["serve", "--port", str(self.a.port), "--store", str(self.store),
                                            "--generator", str(self.ckpt), "--list-descriptions"]
        if self.ray_address:
            cmd += ["--ray-address", self.ray_address]
        self.server = srv.start(cmd, self.server_env(), self.a.port, self.logdir / f"{name}.log", timeout_s=600)
        self.events.append((f"server {name} healthy", self.now()))

    def server_env(self) -> dict[str, str]:
        env = {"LORAGEN_STORE_MAX_ADAPTERS": str(self.a.store_max_adapters),
               "LORAGEN_GENERATE_TIMEOUT_S": str(self.a.server_deadline_s),
               "VLLM_CPU_KVCACHE_SPACE": str(self.a.kv_gib)}
        return {**env, **RAY_ENV} if self.ray_address else env

    def load(self, seconds: float, clients: int, max_req: int = 200) -> None:
        """Mixed load: stored, new and base-model requests round-robin from ``clients`` threads."""
        stop_at = time.monotonic() + seconds
        stored = self.a_stored

        def client(ci: int) -> None:
            for n in range(max_req):
                if time.monotonic() > stop_at:
                    return
                k = (n + ci) % 3
                if k == 0:
                    self.ask(stored[n % len(stored)], "stored")
                elif k == 1:
                    self.ask(self.new_description(), "new")
                else:
                    self.ask(BASE, "base")
        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + self.a.deadline_s + 30)

    a_stored: tuple[str, ...] = tuple(f"Answer in one word, task {i}." for i in range(3))

    def stored_in_store(self, phase: str, n: int, exclude: set[str] = frozenset()) -> list[str]:
        """Descriptions answered in ``phase`` whose adapter folder is in the store now."""
        out = []
        for e in self.ledger.entries.values():
            if e.phase == phase and e.description not in exclude and (self.store / "adapters" / e.key).is_dir():
                out.append(e.description)
            if len(out) == n:
                break
        return out

    def same_as_answered(self, a: Answer) -> str:
        """The store's adapter ``a`` names against the one first answered (`Ledger.compare`)."""
        parsed = parse_adapter_header(a.adapter)
        return self.ledger.compare(parsed[0]) if parsed else "no header"


def brief(a: Answer) -> dict:
    """An answer as the report shows it."""
    d = {"status": a.status, "s": round(a.seconds, 2)}
    if a.retry_after:
        d["retry_after"] = a.retry_after
    if a.message:
        d["message"] = a.message[:200]
    return d


# ----------------------------------------------------------------------------------------------
# Phases


def phase_warmup(r: Run) -> None:
    r.enter("warmup")
    for d in r.a_stored:
        r.ask(d, "stored")
    r.enter("mixed")
    r.load(r.a.phase_s, r.a.clients)


def phase_disconnect(r: Run) -> None:
    r.enter("disconnect")
    assert r.server is not None
    dm = "Translate the sentence into French (disconnect test)."
    disconnect_mid_generation(r.a.port, dm)
    a = r.ask(dm, "after_disconnect")
    r.faults["client_disconnect"] = {"same_description_after": brief(a),
                                     "health_after": srv.http_ok(r.server.url + "/health")}


def phase_corrupt_resolved(r: Run) -> None:
    """Corrupt two adapters vLLM remembers (16 data bytes inverted: same size, valid header; and
    the safetensors header length inverted), push them out of vLLM's CPU LoRA cache with new
    descriptions, ask for each again, then check the server (/health, the base model)."""
    r.enter("corrupt_resolved")
    victims = {"flip": r.a_stored[2], "header": r.a_stored[1]}
    keys: dict[str, str] = {}
    for how, desc in victims.items():
        parsed = parse_adapter_header(r.ask(desc, f"victim_{how}_before").adapter)
        if parsed:
            keys[how] = parsed[0]
    what = {how: injectors.corrupt_adapter(r.store / "adapters" / k, how) for how, k in keys.items()}
    n_push = r.a.push_out
    descs = [r.new_description() for _ in range(n_push)]
    threads = [threading.Thread(target=lambda ds: [r.ask(d, "push_out", 1) for d in ds], args=(descs[i::4],), daemon=True)
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=n_push * 10 + r.a.deadline_s)
    res: dict = {"pushed_out_with_new_descriptions": n_push}
    for how, desc in victims.items():
        a = r.ask(desc, f"victim_{how}_after")
        res[how] = {"key": keys.get(how), "corruption": what.get(how), "asked_again": brief(a)}
    time.sleep(2)
    assert r.server is not None
    res["health_after"] = srv.http_ok(r.server.url + "/health")
    res["base_after"] = brief(r.ask(BASE, "base_after"))
    res["new_after"] = brief(r.ask(r.new_description(), "new_after"))
    res["server_process_alive"] = r.server.process is not None and r.server.process.poll() is None
    state = verify_store(r.store)
    res["store_folders_still_corrupt"] = sorted(how for how, k in keys.items() if any(c["key"] == k for c in state["corrupt"]))
    r.faults["corrupt_resolved"] = res


def phase_kill9(r: Run) -> list[tuple[str, str]]:
    """SIGKILL with new descriptions in flight; corrupt three stored adapters and break the
    generator while the server is down; returns (description, how) of the corrupted ones."""
    r.enter("kill9")
    assert r.server is not None and r.server.process is not None
    inflight = [threading.Thread(target=r.ask, args=(f"Kill test description {i}.", "inflight_at_kill"), daemon=True)
                for i in range(3)]
    for t in inflight:
        t.start()
    time.sleep(3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(r.server.process.pid, signal.SIGKILL)
    r.server.process.wait(timeout=60)
    r.killed_at = time.time()
    for t in inflight:
        t.join(timeout=30)
    r.server = None
    after_kill = verify_store(r.store)
    corrupted = []
    for desc in r.stored_in_store("mixed", 3, exclude=set(r.a_stored)):
        e = next(x for x in r.ledger.entries.values() if x.description == desc)
        how = ("truncate", "flip", "no_meta")[len(corrupted)]
        corrupted.append((desc, how, injectors.corrupt_adapter(r.store / "adapters" / e.key, how)))
    broke = injectors.break_checkpoint(r.ckpt)
    r.faults["kill9_restart"] = {"store_right_after_kill": {**after_kill, "corrupt": len(after_kill["corrupt"])},
                                 "corrupted_while_down": [{"how": h, "what": w} for _, h, w in corrupted],
                                 "generator_broken": broke}
    r.enter("restart")
    t = time.monotonic()
    r.start_server("serve2")
    r.faults["kill9_restart"]["restart_s"] = round(time.monotonic() - t, 1)
    return [(d, h) for d, h, _ in corrupted]


def phase_generator_broken(r: Run, corrupted: list[tuple[str, str]]) -> None:
    r.enter("generator_broken")
    assert r.server is not None
    skip = {d for d, _ in corrupted} | set(r.a_stored)
    stored = r.stored_in_store("mixed", 3, exclude=skip)
    r.ledger_used += stored
    res: dict = {"stored": [brief(r.ask(d, "stored")) for d in stored],
                 "new": [brief(r.ask(r.new_description(), "new")) for _ in range(3)],
                 "corrupted": [{"how": h, **brief(r.ask(d, "corrupted"))} for d, h in corrupted],
                 "base": brief(r.ask(BASE, "base")),
                 "health": srv.http_ok(r.server.url + "/health")}
    injectors.restore_checkpoint(r.ckpt)
    r.enter("generator_restored")
    res["new_after_restore"] = [brief(r.ask(r.new_description(), "new")) for _ in range(3)]
    after = []
    for d, h in corrupted:
        a = r.ask(d, "corrupted")
        after.append({"how": h, **brief(a), "vs_first_answer": r.same_as_answered(a)})
    res["corrupted_after_restore"] = after
    res["quarantined"] = len(verify_store(r.store)["quarantined"])
    r.faults["generator_broken"] = res


def phase_disk_full(r: Run, tmpfs: bool) -> None:
    r.enter("disk_full")
    if not tmpfs:
        r.faults["disk_full"] = {"skipped": "the store is not on a file system of its own (mount failed)"}
        return
    assert r.server is not None
    filler = r.store.parent / "filler"
    res: dict = {"free_before": injectors.free_bytes(r.store)}
    res["filler_bytes"] = injectors.fill_disk(filler)
    res["free_after_fill"] = injectors.free_bytes(r.store)
    stored = r.stored_in_store("mixed", 3, exclude=set(r.a_stored) | set(r.ledger_used))
    r.ledger_used += stored
    res["stored_not_resolved"] = [brief(r.ask(d, "stored")) for d in stored]
    res["stored_resolved"] = [brief(r.ask(d, "stored")) for d in stored]  # now vLLM remembers them
    res["new"] = [brief(r.ask(r.new_description(), "new")) for _ in range(4)]
    res["base"] = brief(r.ask(BASE, "base"))
    # The killed server's pins hold for one lease (LORAGEN_PIN_LEASE_S, 120 s): until then gc
    # may evict nothing of what it had resolved. Wait for them to expire, under full disk.
    wait = max(0.0, r.a.pin_lease_s + 5 - (time.time() - r.killed_at))
    res["waited_for_dead_pins_s"] = round(wait, 1)
    time.sleep(wait)
    res["new_after_wait"] = [brief(r.ask(r.new_description(), "new")) for _ in range(2)]
    n = sum(1 for _ in (r.store / "adapters").iterdir())
    cli = subprocess.run(srv.loragen_serve_prefix() + ["store", "gc", "--store", str(r.store),
                                                       "--max-adapters", str(max(0, n - 10)), "--json"],
                         capture_output=True, text=True, timeout=120)
    try:
        gc = json.loads(cli.stdout)
        res["store_gc"] = {"rc": cli.returncode, "evicted": len(gc.get("evicted", [])), "freed_bytes": gc.get("freed_bytes"),
                           "left": gc.get("count"), "pinned": gc.get("pinned")}
    except ValueError:
        res["store_gc"] = {"rc": cli.returncode, "stderr": cli.stderr[-300:]}
    res["free_after_gc"] = injectors.free_bytes(r.store)
    res["new_after_gc"] = [brief(r.ask(r.new_description(), "new")) for _ in range(3)]
    filler.unlink()
    res["free_after_filler_deleted"] = injectors.free_bytes(r.store)
    res["new_after_filler_deleted"] = [brief(r.ask(r.new_description(), "new")) for _ in range(3)]
    r.faults["disk_full"] = res


def phase_soak(r: Run) -> None:
    r.enter("soak")
    end_at = time.monotonic() + r.a.soak_max_s
    next_i = [0]

    def client() -> None:
        while time.monotonic() < end_at:
            with r.lock:
                i = next_i[0]
                if i >= r.a.soak:
                    return
                next_i[0] += 1
            a = r.ask(f"Soak task {i}: answer the message as task number {i} would.", "new", r.a.soak_max_tokens)
            with r.lock:  # only an answered description counts towards the memory target's N
                r.soak_done += a.ok
                r.soak_failed += not a.ok
            if not a.ok and a.error and a.error.startswith("conn"):
                time.sleep(1)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(r.a.soak_clients)]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=r.a.soak_max_s + r.a.deadline_s + 60)
    r.faults["soak"] = {"descriptions_sent": next_i[0], "answered": r.soak_done, "failed": r.soak_failed,
                        "seconds": round(time.monotonic() - t, 1),
                        "time_limited": next_i[0] < r.a.soak, "clients": r.a.soak_clients,
                        "max_tokens": r.a.soak_max_tokens}


def _generator_cli(r: Run, *args: str, timeout_s: float) -> dict:
    """``loragen-vllm generator ARGS --ray-address ...``: its JSON answer (RuntimeError if it failed)."""
    assert r.ray_address is not None
    out = subprocess.run(srv.loragen_serve_prefix() + ["generator", *args, "--ray-address", r.ray_address],
                         capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **RAY_ENV})
    if out.returncode != 0:
        raise RuntimeError(f"loragen-vllm generator {args[0]} failed ({out.returncode}): {out.stderr[-500:]}")
    return json.loads(out.stdout)


def phase_ray_actor_kill(r: Run) -> None:
    """The server restarted on the Ray actor; SIGKILL of the actor amid new descriptions.

    What `ray_actor.py` and `ray_backend.py` promise: Ray restarts the actor and re-sends the calls
    in flight; calls sent while it is down wait for it; each request is a 200 once the actor is
    back, or a 503 at the server's bound on one call (LORAGEN_RAY_TIMEOUT_S), never past the
    client's deadline. Every 200 goes into the ledger like any other answer.
    """
    r.enter("ray_actor_kill")
    assert r.server is not None
    r.server.stop(grace_s=20)
    r.server = None
    r.ray_head, r.ray_address = start_ray_head(r.logdir, None)
    t = time.monotonic()
    before = _generator_cli(r, "start", "--checkpoint", str(r.ckpt), "--timeout", "300", timeout_s=360)
    res: dict = {"actor_start_s": round(time.monotonic() - t, 1), "actor_pid_before": before["pid"]}
    r.start_server("serve3_ray")
    res["before_kill"] = [brief(r.ask(r.new_description(), "new")) for _ in range(2)]
    stop_at = time.monotonic() + r.a.ray_phase_s
    timed: list[tuple[float, float, str]] = []  # (sent, answered, status) of the clients' requests

    def client() -> None:
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            a = r.ask(r.new_description(), "new")
            timed.append((sent, time.monotonic(), a.status))
    threads = [threading.Thread(target=client, daemon=True) for _ in range(r.a.clients)]
    for th in threads:
        th.start()
    time.sleep(r.a.ray_phase_s / 3)
    os.kill(before["pid"], signal.SIGKILL)  # the actor's worker process, on this machine
    killed = time.monotonic()
    r.events.append(("actor killed", r.now()))
    after = before
    while after.get("pid") == before["pid"] and time.monotonic() - killed < 300:
        time.sleep(1)
        with contextlib.suppress(RuntimeError, ValueError, subprocess.TimeoutExpired):
            after = _generator_cli(r, "status", "--timeout", "10", timeout_s=60)
    res["actor_back_s"] = round(time.monotonic() - killed, 1) if after.get("pid") != before["pid"] else None
    res["actor_after"] = {k: after.get(k) for k in ("pid", "reconstructed", "stats")}
    for th in threads:
        th.join(timeout=r.a.ray_phase_s + r.a.deadline_s + 30)
    spanning = [status for sent, answered, status in timed if sent < killed < answered]
    res["requests_spanning_the_kill"] = {"count": len(spanning), "statuses": dict(Counter(spanning))}
    with contextlib.suppress(RuntimeError, ValueError, subprocess.TimeoutExpired):
        res["actor_stats_at_end"] = _generator_cli(r, "status", "--timeout", "10", timeout_s=60).get("stats")
    res["new_after_restart"] = [brief(r.ask(r.new_description(), "new")) for _ in range(3)]
    res["health_after"] = srv.http_ok(r.server.url + "/health")
    r.faults["ray_actor_kill"] = res


def run_all(a: argparse.Namespace, on_error: Callable[[Run, BaseException], None]) -> Run:
    """Every phase in order; the server is always stopped and the tmpfs unmounted."""
    work = Path(tempfile.mkdtemp(prefix="faults_"))
    fs = work / "fs"
    mount_error = injectors.mount_tmpfs(fs, a.tmpfs_size) if a.tmpfs_size != "none" else "not asked (--tmpfs-size none)"
    store = fs / "store"
    store.mkdir(parents=True, exist_ok=True)
    ckpt = injectors.copy_checkpoint(CHECKPOINT, work / "checkpoint")
    r = Run(a, store, ckpt, work / "logs")
    r.faults["store_filesystem"] = {"tmpfs": mount_error is None, "size": a.tmpfs_size, "mount_error": mount_error,
                                    "path": str(fs)}
    try:
        r.enter("start")
        r.start_server("serve1")
        r.sampler.start()
        phase_warmup(r)
        phase_disconnect(r)
        phase_corrupt_resolved(r)
        corrupted = phase_kill9(r)
        r.ledger_used += [d for d, _ in corrupted]
        phase_generator_broken(r, corrupted)
        phase_disk_full(r, mount_error is None)
        r.enter("after_faults")
        r.load(r.a.phase_s / 2, r.a.clients)
        phase_soak(r)
        phase_ray_actor_kill(r)
        r.enter("lost_check")
        assert r.server is not None
        fault_phases = tuple({e.phase for e in r.ledger.entries.values()} - {"soak"})
        r.faults["adapters"] = r.ledger.check(lambda d: r.ask(d, "reask"), a.lost_sample, always_phases=fault_phases)
        r.sampler.sample()
        r.enter("end")
    except BaseException as e:  # recorded; the report is still written
        on_error(r, e)
    finally:
        r.sampler.stop()
        if r.server:
            r.server.stop(grace_s=20)
        if r.ray_head is not None:
            stop_ray_head(r.ray_head)
        r.faults["store_final"] = verify_store(store)
        r.faults["store_final"]["corrupt"] = r.faults["store_final"]["corrupt"][:10]
        r.faults["store_final"]["quarantined"] = len(r.faults["store_final"]["quarantined"])
        r.faults["store_final"]["partial_dirs"] = r.faults["store_final"]["partial_dirs"][:10]
        if mount_error is None:
            injectors.unmount(fs)
    return r
