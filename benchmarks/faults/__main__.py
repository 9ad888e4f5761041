"""python -m benchmarks.faults: a bounded fault run against a real `loragen-vllm serve` on loopback.

Mixed load (stored descriptions, new descriptions, base model) from a few client threads, with
faults injected in order: a client that disconnects mid-generation, a truncated safetensors file
in the store, kill -9 of the server then a restart on the same store. Afterwards every stored
adapter is verified against the sha256 list in its loragen_meta.json. Every loop is bounded in
count and time, every wait has a deadline, and the server is always stopped.
"""
from __future__ import annotations

import argparse, json, os, platform, shlex, signal, socket, sys, tempfile, threading, time
import urllib.error, urllib.request
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.provenance import git_commit
from benchmarks.serving import server as srv
from benchmarks.serving.meta import device
from loragen_vllm.store_meta import verify_folder

REPO = Path(__file__).resolve().parents[2]
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def rss_kib(pid: int) -> int:
    """VmRSS of pid and all its descendants (from /proc), KiB."""
    total, seen, todo = 0, set(), [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = (t / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, ValueError):
            pass
    return total


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.outcomes, self.errors, self.past_deadline, self.records = Counter(), Counter(), 0, []

    def add(self, kind, outcome, err, dur, deadline):
        with self.lock:
            self.outcomes[f"{kind}:{outcome}"] += 1
            if err:
                self.errors[err] += 1
            if dur > deadline:
                self.past_deadline += 1
            self.records.append({"kind": kind, "outcome": outcome, "error": err, "s": round(dur, 2)})


def chat(url, model, deadline, stats, kind, phase):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello."}],
                       "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    outcome, err = None, None
    try:
        with urllib.request.urlopen(req, timeout=deadline) as r:
            r.read()
            outcome = str(r.status)
    except urllib.error.HTTPError as e:
        outcome, err = str(e.code), f"http_{e.code}"
    except (socket.timeout, TimeoutError):
        outcome, err = "timeout", "client_deadline"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        outcome, err = "conn_error", f"conn:{type(reason).__name__}"
    dur = time.monotonic() - t0
    stats.add(f"{phase}/{kind}", outcome, err, dur, deadline)
    return outcome


def disconnect_mid_generation(port, model, wait_s=1.5):
    """Send a request for a new description, then close the socket before the answer."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 8}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(wait_s)
    s.close()


def verify_store(store: Path) -> dict:
    """Every adapter folder: every file in loragen_meta.json present with its sha256."""
    ok, bad, partial = [], [], []
    adir = store / "adapters"
    for d in sorted(adir.iterdir()) if adir.exists() else []:
        if not d.is_dir():
            continue
        if d.name.startswith(".") or "tmp" in d.name:
            partial.append(d.name)
            continue
        try:
            verify_folder(d, d.name)
            why = None
        except Exception as e:  # StoreCorrupt or unreadable meta
            why = f"{type(e).__name__}: {e}"[:300]
        (bad.append({"key": d.name, "why": why}) if why else ok.append(d.name))
    tmp = store / "tmp"
    partial += [f"tmp/{p.name}" for p in tmp.iterdir()] if tmp.exists() else []
    q = store / "quarantine"
    others = [p.name for p in q.iterdir()] if q.exists() else []
    return {"ok": len(ok), "corrupt": bad, "partial_dirs": partial, "quarantined": others}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--deadline-s", type=float, default=120.0)
    ap.add_argument("--phase-s", type=float, default=45.0, help="load time per phase")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/faults_cpu"))
    a = ap.parse_args(argv)
    t_start = time.time()
    store = Path(tempfile.mkdtemp(prefix="faults_store_"))
    logdir = Path(tempfile.mkdtemp(prefix="faults_logs_"))
    cmd = srv.loragen_serve_prefix() + ["serve", "--port", str(a.port), "--store", str(store)]
    stats, rss, faults, events = Stats(), [], {}, []
    stored = [f"Answer in one word, task {i}." for i in range(3)]
    new_i = [0]
    server = None

    def load_phase(phase, seconds, max_req=60):
        stop_at = time.monotonic() + seconds
        def client(ci):
            for n in range(max_req):
                if time.monotonic() > stop_at:
                    return
                k = (n + ci) % 3
                if k == 0:
                    chat(server.url, stored[n % len(stored)], a.deadline_s, stats, "stored", phase)
                elif k == 1:
                    with stats.lock:
                        new_i[0] += 1; i = new_i[0]
                    chat(server.url, f"Reply with the number {i} spelled out.", a.deadline_s, stats, "new", phase)
                else:
                    chat(server.url, BASE, a.deadline_s, stats, "base", phase)
        ts = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(a.clients)]
        for t in ts: t.start()
        while any(t.is_alive() for t in ts) and time.monotonic() < stop_at + a.deadline_s + 10:
            if server.process: rss.append({"t": round(time.time() - t_start, 1), "phase": phase, "rss_mib": round(rss_kib(server.process.pid) / 1024, 1)})
            time.sleep(2)

    try:
        server = srv.start(cmd, {}, a.port, logdir / "serve1.log", timeout_s=400)
        events.append(("started", round(time.time() - t_start, 1)))
        # warm-up: the stored descriptions
        for d in stored:
            chat(server.url, d, a.deadline_s, stats, "stored_warmup", "warmup")
        load_phase("mixed", a.phase_s)
        # (1) client disconnects mid-generation, then the same description must still work
        dm = "Translate the sentence into French (disconnect test)."
        disconnect_mid_generation(a.port, dm)
        o = chat(server.url, dm, a.deadline_s, stats, "after_disconnect", "disconnect")
        h = srv.http_ok(server.url + "/health")
        faults["client_disconnect"] = {"same_description_after": o, "health_after": h}
        # (2) truncate a stored adapter's safetensors
        before = verify_store(store)
        adapters = [d for d in (store / "adapters").iterdir() if d.is_dir() and (d / "loragen_meta.json").exists()]
        victim = None
        for d in adapters:
            if json.loads((d / "loragen_meta.json").read_text()).get("description") == stored[0]:
                victim = d
        victim = victim or (adapters[0] if adapters else None)
        if victim:
            st = victim / "adapter_model.safetensors"
            size = st.stat().st_size
            with open(st, "r+b") as f:
                f.truncate(size // 2)
            desc = json.loads((victim / "loragen_meta.json").read_text()).get("description", stored[0])
            o = chat(server.url, desc, a.deadline_s, stats, "corrupted_desc", "corrupt")
            after = verify_store(store)
            faults["corrupt_safetensors"] = {"key": victim.name, "truncated_from": size, "request": o,
                                             "victim_ok_after": victim.name not in [c["key"] for c in after["corrupt"]],
                                             "store_after": after, "store_before_ok": before["ok"]}
        load_phase("after_corrupt", a.phase_s / 2)
        # (3) kill -9 during load with new descriptions in flight, restart on the same store
        ts = [threading.Thread(target=chat, args=(server.url, f"Kill test description {i}.", 30, stats, "inflight_at_kill", "kill9"), daemon=True) for i in range(2)]
        for t in ts: t.start()
        time.sleep(3)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
        for t in ts: t.join(timeout=40)
        after_kill = verify_store(store)
        events.append(("killed", round(time.time() - t_start, 1)))
        server = srv.start(cmd, {}, a.port, logdir / "serve2.log", timeout_s=400)
        events.append(("restarted", round(time.time() - t_start, 1)))
        o = [chat(server.url, d, a.deadline_s, stats, "stored_after_restart", "restart") for d in stored]
        faults["kill9_restart"] = {"store_right_after_kill": after_kill, "stored_after_restart": o}
        load_phase("after_restart", a.phase_s / 2)
    except Exception as e:  # recorded, the report still gets written
        events.append(("error", repr(e)[:500]))
    finally:
        if server: server.stop(grace_s=20)
    final = verify_store(store)
    cli = None
    try:
        import subprocess
        r = subprocess.run(srv.loragen_serve_prefix() + ["store", "ls", "--json"], env={**os.environ, "LORAGEN_STORE": str(store)},
                           capture_output=True, text=True, timeout=60)
        cli = {"rc": r.returncode, "n": len(json.loads(r.stdout)) if r.returncode == 0 else None}
    except Exception as e:
        cli = {"error": repr(e)[:200]}
    res = {
        "command": "python -m benchmarks.faults " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
        "server_command": cmd, "commit": git_commit(), "machine": device(), "host": platform.node(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "duration_s": round(time.time() - t_start, 1),
        "deadline_s": a.deadline_s, "events": events,
        "requests_by_outcome": dict(stats.outcomes), "errors_by_kind": dict(stats.errors),
        "requests_total": len(stats.records), "requests_past_deadline": stats.past_deadline,
        "faults": faults, "store_final": final, "store_ls_cli": cli,
        "adapters_corrupt_final": len(final["corrupt"]), "partial_adapters_final": len(final["partial_dirs"]),
        "rss_mib": rss,
        "targets": {
            # judged from the store after the run: no corrupt file, no partial folder (a count of the
            # adapters before and after the faults is not compared)
            "0 adapters lost or corrupt": "met" if not final["corrupt"] and not final["partial_dirs"] else "missed",
            "0 requests past deadline": "met" if stats.past_deadline == 0 else "missed",
            "memory growth <10% over 10,000 descriptions": "out of scope (small run, ~%d new descriptions)" % new_i[0],
        },
        "skipped": ["broken generator", "disk full", "Ray actor kill", "10,000-description memory soak"],
        "server_logs": str(logdir),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    r0 = [x["rss_mib"] for x in rss]
    md = [f"# Fault run (CPU) — {res['date']}", "", f"Command: `{res['command']}`  ", f"Commit: `{res['commit']}`  ",
          f"Machine: {res['machine'].get('summary')}  ", f"Duration: {res['duration_s']} s, client deadline {a.deadline_s} s", "",
          "## Targets", *[f"- {k}: **{v}**" for k, v in res["targets"].items()], "",
          "## Requests by outcome", *[f"- {k}: {v}" for k, v in sorted(stats.outcomes.items())], "",
          "## Errors by kind", *([f"- {k}: {v}" for k, v in sorted(stats.errors.items())] or ["- none"]), "",
          f"Past deadline: {stats.past_deadline}. Store after run: {final['ok']} adapters verified, "
          f"{len(final['corrupt'])} corrupt, {len(final['partial_dirs'])} partial.", "",
          "## Faults", "```json", json.dumps(faults, indent=1, default=str)[:4000], "```", "",
          f"Server RSS (process + children): first {r0[0] if r0 else '-'} MiB, max {max(r0) if r0 else '-'} MiB, last {r0[-1] if r0 else '-'} MiB over {len(r0)} samples.", "",
          "Events: " + json.dumps(events), "", "Skipped: " + ", ".join(res["skipped"])]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
