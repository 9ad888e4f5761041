"""The server's side of a generated adapter's first request: where its time went.

Read from what the server writes, matched to client requests by description, never estimated:
- the store's metadata (`<store>/adapters/<key>/loragen_meta.json`): `created` is stamped when
  publishing starts, so `published_after` = created - request start (client clock; same
  machine) covers validation, queueing, the generator pass and serialisation;
- the in-process backend's log line per generator pass
  (`generator pass N [finished]: B adapter(s) in T s (encode e[ + w during the window], diffuse d,
  decode c)`; w: the window's first description encoded before the pass) and the plugin's
  line per generated adapter (`loragen generated adapter key=K in T s ...`), which follows
  its pass's line: each adapter line is given to the latest earlier pass that still has room;
- a structured line `loragen timing {json}` per adapter, if the plugin writes one (fields:
  description or key, and seconds for any of queue, encode, diffuse, decode, publish, plus
  batch_size); it takes precedence.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

try:  # the project's own normalisation, so descriptions match the store's
    from loragen_vllm.descriptions import normalize_description
except ImportError:  # pragma: no cover - the benchmark may run without the project installed
    import unicodedata

    def normalize_description(text: str) -> str:
        return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


_PASS_RE = re.compile(r"generator pass (?P<n>\d+)(?: finished)?: (?P<b>\d+) adapter\(s\) in (?P<t>[\d.]+) s "
                      r"\(encode (?P<e>[\d.]+)(?: \+ (?P<early>[\d.]+) during the window)?, "
                      r"diffuse (?P<d>[\d.]+), decode (?P<c>[\d.]+)\)")
_GEN_RE = re.compile(r"loragen generated adapter key=(?P<key>[0-9a-f]{64}) in (?P<t>[\d.]+) s")
_TIMING_RE = re.compile(r"loragen[-_ ]timing (?P<json>\{.*\})\s*$")


def store_meta(store_dir: Path | None) -> dict[str, dict]:
    """Store key -> {"description", "created" (Unix seconds)} for every adapter in the store."""
    out: dict[str, dict] = {}
    if store_dir is None:
        return out
    for meta_path in Path(store_dir).glob("adapters/*/loragen_meta.json"):
        try:
            m = json.loads(meta_path.read_text())
            created = datetime.fromisoformat(m["created"].replace("Z", "+00:00")).timestamp()
            out[m.get("key", meta_path.parent.name)] = {"description": m["description"], "created": created}
        except (OSError, ValueError, KeyError):
            continue
    return out


def parse_pass_lines(log_text: str) -> dict[str, dict]:
    """Store key -> its generator pass {encode, diffuse, decode, pass_s, batch_size, gen_publish_s,
    and encode_early where the line has it}."""
    passes: list[dict] = []
    out: dict[str, dict] = {}
    for line in log_text.splitlines():
        if m := _PASS_RE.search(line):
            passes.append({"batch_size": int(m["b"]), "pass_s": float(m["t"]), "encode": float(m["e"]),
                           "diffuse": float(m["d"]), "decode": float(m["c"]), "room": int(m["b"])}
                          | ({"encode_early": float(m["early"])} if m["early"] is not None else {}))
        elif m := _GEN_RE.search(line):
            owner = next((p for p in reversed(passes) if p["room"] > 0), None)
            if owner is None:
                continue
            owner["room"] -= 1
            out[m["key"]] = {k: v for k, v in owner.items() if k != "room"} | {"gen_publish_s": float(m["t"])}
    return out


def parse_timing_lines(log_text: str) -> dict[str, dict]:
    """Normalised description (or key) -> timings, from `loragen timing {json}` lines."""
    out: dict[str, dict] = {}
    for line in log_text.splitlines():
        m = _TIMING_RE.search(line)
        if not m:
            continue
        try:
            d = json.loads(m.group("json"))
        except ValueError:
            continue
        ident = d.pop("description", None)
        ident = normalize_description(ident) if isinstance(ident, str) else d.pop("key", None)
        if isinstance(ident, str):
            out[ident] = d
    return out


def attach_server_timings(phases: list[dict], log_text: str, store_dir: Path | None) -> dict:
    """Add `server` timings to the request that caused each generation (in place).

    That is the first request for a description, and only if the adapter was published after
    it started and before it ended. Returns counts of what was found.
    """
    meta = store_meta(store_dir)
    by_desc = {m["description"]: (key, m) for key, m in meta.items()}
    passes = parse_pass_lines(log_text)
    structured = parse_timing_lines(log_text)
    first: dict[str, dict] = {}
    for p in phases:
        for r in p["records"]:
            d = normalize_description(r["model"])
            if (d in by_desc or d in structured) and (d not in first or r["wall_start"] < first[d]["wall_start"]):
                first[d] = r
    n_attached = 0
    for d, r in first.items():
        key, m = by_desc.get(d, (None, None))
        s: dict = {}
        if m is not None and r.get("e2e") is not None and r["wall_start"] <= m["created"] <= r["wall_start"] + r["e2e"]:
            s["published_after"] = m["created"] - r["wall_start"]
            if key in passes:
                s.update(passes[key])
        timing = structured.get(d) or (structured.get(key) if key else None)
        if timing:
            s.update({f"plugin_{k}" if k in s else k: v for k, v in timing.items() if isinstance(v, (int, float))})
        if s:
            s["source"] = "+".join(name for name, ok in (("store_meta", "published_after" in s),
                                                         ("pass_log", "pass_s" in s),
                                                         ("timing_log", bool(timing))) if ok)
            r["server"] = s
            n_attached += 1
    # An oracle name that vLLM forgot would reach our resolver and be generated as a
    # "description": that would make the oracle arm measure generated adapters. Say so.
    leaked = sorted(m["description"] for m in meta.values() if m["description"].startswith("oracle-"))
    return {"store_adapters": len(meta), "pass_log_adapters": len(passes), "timing_lines": len(structured),
            "records_with_server_timings": n_attached, "oracle_names_generated": leaked}


def reattach_pass_lines(phases: list[dict], log_text: str, fingerprint: str, seed: int = 0) -> int:
    """Add the generator pass's timings from a saved server log to records that got only the
    store's (``source == "store_meta"``: the log's pass lines were not read when the run ended,
    e.g. a format the parser did not know yet). The store is gone by then, so each record's
    store key is computed from its description, the generator's fingerprint and the seed.
    Returns how many records gained pass timings."""
    from loragen_vllm.store import AdapterStore

    passes = parse_pass_lines(log_text)
    n = 0
    for p in phases:
        for r in p["records"]:
            srv = r.get("server")
            if not srv or srv.get("source") != "store_meta":
                continue
            found = passes.get(AdapterStore.key(r["model"], fingerprint, seed))
            if found:
                srv.update(found)
                srv["source"] = "store_meta+pass_log"
                n += 1
    return n
