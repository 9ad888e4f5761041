"""The server's side of a generated adapter's first request: where its time went.

Two sources, both written by the server itself, matched to client requests by description:
- the store's metadata (`<store>/adapters/<key>/loragen_meta.json`): its `created` timestamp
  says when the adapter was published, so `published_after` = created - request start is
  queueing + encode + diffuse + decode + publish as one number;
- the plugin's timing log lines (see `parse_timing_lines`), where the plugin writes them:
  encode / diffuse / decode / publish (and queue, batch size) per description.
Only what the server reports is used; nothing is estimated here.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

try:  # the project's own normalisation, so descriptions match the store's
    from loragen_vllm.descriptions import normalize_description
except ImportError:  # pragma: no cover - the benchmark may run against a remote server
    import unicodedata

    def normalize_description(text: str) -> str:
        return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def store_created(store_dir: Path | None) -> dict[str, float]:
    """Normalised description -> publish time (Unix seconds) for every adapter in the store."""
    out: dict[str, float] = {}
    if store_dir is None:
        return out
    for meta_path in Path(store_dir).glob("adapters/*/loragen_meta.json"):
        try:
            m = json.loads(meta_path.read_text())
            out[m["description"]] = datetime.fromisoformat(m["created"].replace("Z", "+00:00")).timestamp()
        except (OSError, ValueError, KeyError):
            continue
    return out


_TIMING_RE = re.compile(r"loragen[-_ ]timing (?P<json>\{.*\})\s*$")


def parse_timing_lines(log_text: str) -> dict[str, dict]:
    """Normalised description -> timings, from the plugin's `loragen timing {json}` log lines.

    Each JSON object carries "description" and seconds for any of encode, diffuse, decode,
    publish, queue, load, plus batch_size. Lines that do not parse are ignored.
    """
    out: dict[str, dict] = {}
    for line in log_text.splitlines():
        m = _TIMING_RE.search(line)
        if not m:
            continue
        try:
            d = json.loads(m.group("json"))
        except ValueError:
            continue
        desc = d.pop("description", None)
        if isinstance(desc, str):
            out[normalize_description(desc)] = d
    return out


def attach_server_timings(phases: list[dict], log_text: str, store_dir: Path | None) -> dict:
    """Add `server` timings to the first request of each generated description (in place).

    A record gets them only if it is the request that caused the generation: the adapter was
    published after the request started and before it ended. Returns what was found.
    """
    created = store_created(store_dir)
    timings = parse_timing_lines(log_text)
    first: dict[str, dict] = {}
    for p in phases:
        for r in p["records"]:
            key = normalize_description(r["model"])
            if (key in created or key in timings) and (key not in first or r["wall_start"] < first[key]["wall_start"]):
                first[key] = r
    n_attached = 0
    for key, r in first.items():
        s: dict = {}
        t_pub = created.get(key)
        if t_pub is not None and r.get("e2e") is not None and r["wall_start"] <= t_pub <= r["wall_start"] + r["e2e"]:
            s["published_after"] = t_pub - r["wall_start"]
        if key in timings:
            s.update({k: v for k, v in timings[key].items() if isinstance(v, (int, float))})
        if s:
            s["source"] = "+".join(x for x, ok in (("store_meta", "published_after" in s),
                                                    ("plugin_log", key in timings)) if ok)
            r["server"] = s
            n_attached += 1
    return {"store_adapters": len(created), "plugin_timing_lines": len(timings),
            "records_with_server_timings": n_attached,
            "sources": "store metadata `created` (publish time); plugin log lines 'loragen timing {json}'"}
