"""Does vLLM apply a generated adapter as peft does?

Starts a real ``loragen-vllm serve`` (default generator, a fresh store), asks /v1/completions for
the next token's top-k logprobs (temperature 0, max_tokens 1) under a few descriptions and the
base model, then recomputes the same next-token log-probabilities with transformers + peft
(``PeftModel.from_pretrained(base, <store>/adapters/<key>)``) on the same prompt token ids, in
the dtype vLLM served and in float32. Claim: vLLM-vs-peft differences are at rounding level and
clearly smaller than adapter-vs-base differences.

    python -m benchmarks.adapter_parity
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from benchmarks.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "adapter_parity.json"
STARTUP_TIMEOUT_S = 420.0
TOP_K = 5
DESCRIPTIONS = [
    "Classify the sentiment of a movie review as positive or negative.",
    "Translate English sentences into French.",
    "Answer grade-school math word problems step by step.",
]
PROMPTS = [
    "The movie was absolutely wonderful, and I would rate it",
    "Question: What is 12 plus 7?\nAnswer:",
    "The capital of France is",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    cmd = [str(REPO / ".venv" / "bin" / "loragen-vllm"), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--store", str(store), "--", "--max-model-len", "512", "--max-num-seqs", "4"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    stop_server(proc)
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S:.0f} s: {log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def served_dtype(log_text: str) -> str:
    m = re.search(r"dtype=torch\.(\w+)", log_text) or re.search(r"dtype=(\w+)", log_text)
    return m.group(1) if m else "unknown"


def completion(url: str, model: str, prompt: str) -> tuple[dict, str | None, list[int] | None]:
    r = httpx.post(f"{url}/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": TOP_K,
        "return_token_ids": True})
    r.raise_for_status()
    body = r.json()
    choice = body["choices"][0]
    top = choice["logprobs"]["top_logprobs"][0]  # {token text: logprob}
    return top, r.headers.get("x-loragen-adapter"), body.get("choices", [{}])[0].get("prompt_token_ids")


def main() -> int:
    import torch
    from peft import PeftModel

    from generator.base_model import ensure_base_model, load_base_model

    work = Path(tempfile.mkdtemp(prefix="adapter_parity_"))
    store, log_path = work / "store", work / "server.log"
    t0 = time.time()
    proc, url = start_server(store, log_path)
    rows: dict = {}
    try:
        base_name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        base_top = {p: completion(url, base_name, p)[0] for p in PROMPTS}
        for d in DESCRIPTIONS:
            rows[d] = {"prompts": {}}
            for p in PROMPTS:
                top, hdr, ptids = completion(url, d, p)
                rows[d]["prompts"][p] = {"vllm_top": top, "vllm_prompt_token_ids": ptids}
                if hdr:
                    rows[d]["key"] = hdr.split(";")[0].strip()
        dtype_name = served_dtype(log_path.read_text(errors="replace"))
    finally:
        stop_server(proc)
    serve_s = time.time() - t0

    model_dir = ensure_base_model()
    vllm_dtype = getattr(torch, dtype_name, None) if dtype_name != "unknown" else None
    dtypes = {"float32": torch.float32}
    if isinstance(vllm_dtype, torch.dtype) and vllm_dtype != torch.float32:
        dtypes[dtype_name] = vllm_dtype
    tok = None
    peft_lp: dict = {}  # (dtype, desc or None, prompt) -> full log-softmax

    def next_logprobs(model, ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        return torch.log_softmax(logits, -1)

    for dname, dt in dtypes.items():
        base, tok, _ = load_base_model("cpu", dtype=dt, model_dir=model_dir)
        for p in PROMPTS:
            peft_lp[(dname, None, p)] = next_logprobs(base, tok(p)["input_ids"])
        for d in DESCRIPTIONS:
            adir = store / "adapters" / rows[d]["key"]
            pm = PeftModel.from_pretrained(base, str(adir)).eval()
            for p in PROMPTS:
                peft_lp[(dname, d, p)] = next_logprobs(pm, tok(p)["input_ids"])
            base = pm.unload()  # plain base model again for the next adapter
    assert tok is not None

    def tok_ids(top: dict) -> dict[str, int]:
        out = {}
        for t in top:
            ids = tok.convert_tokens_to_ids([t]) if t in tok.get_vocab() else tok(t, add_special_tokens=False)["input_ids"]
            out[t] = ids[0] if len(ids) == 1 else None
        return out

    summary = {k: 0.0 for k in [f"vllm_vs_peft_{n}" for n in dtypes] + [f"base_vllm_vs_hf_{n}" for n in dtypes]
               + ["vllm_adapter_vs_vllm_base", "peft_float32_vs_base"]}
    # control: the same comparison without any adapter (vLLM's base model vs transformers) = the numeric noise floor
    base_rows = []
    for p in PROMPTS:
        tmap = tok_ids(base_top[p])
        row = {"prompt": p, "vllm_top": base_top[p]}
        for n in dtypes:
            diffs = [abs(lp - peft_lp[(n, None, p)][tmap[t]].item()) for t, lp in base_top[p].items() if tmap[t] is not None]
            row[f"max_abs_base_vllm_vs_hf_{n}"] = max(diffs) if diffs else None
            summary[f"base_vllm_vs_hf_{n}"] = max(summary[f"base_vllm_vs_hf_{n}"], row[f"max_abs_base_vllm_vs_hf_{n}"] or 0)
        base_rows.append(row)
    mismatched_ids = 0
    for d in DESCRIPTIONS:
        for p in PROMPTS:
            r = rows[d]["prompts"][p]
            ids = tok(p)["input_ids"]
            r["prompt_token_ids_match"] = (r["vllm_prompt_token_ids"] is None) or (r["vllm_prompt_token_ids"] == ids)
            mismatched_ids += not r["prompt_token_ids_match"]
            top, tmap = r["vllm_top"], tok_ids(r["vllm_top"])
            for n in dtypes:
                diffs = [abs(lp - peft_lp[(n, d, p)][tmap[t]].item()) for t, lp in top.items() if tmap[t] is not None]
                r[f"max_abs_vllm_vs_peft_{n}"] = max(diffs) if diffs else None
                summary[f"vllm_vs_peft_{n}"] = max(summary[f"vllm_vs_peft_{n}"], r[f"max_abs_vllm_vs_peft_{n}"] or 0)
            # adapter vs base, on vLLM's own numbers (tokens in both top-k lists) and on peft's (vLLM's top-k tokens)
            btop = base_top[p]
            common = [t for t in top if t in btop]
            r["max_abs_vllm_adapter_vs_vllm_base"] = max((abs(top[t] - btop[t]) for t in common), default=None)
            r["top1_adapter"], r["top1_base"] = max(top, key=top.get), max(btop, key=btop.get)
            diffs = [abs(peft_lp[("float32", d, p)][tmap[t]].item() - peft_lp[("float32", None, p)][tmap[t]].item())
                     for t in top if tmap[t] is not None]
            r["max_abs_peft_float32_adapter_vs_base"] = max(diffs) if diffs else None
            summary["vllm_adapter_vs_vllm_base"] = max(summary["vllm_adapter_vs_vllm_base"], r["max_abs_vllm_adapter_vs_vllm_base"] or 0)
            summary["peft_float32_vs_base"] = max(summary["peft_float32_vs_base"], r["max_abs_peft_float32_adapter_vs_base"] or 0)
            del r["vllm_prompt_token_ids"]
        rows[d]["prompts"] = [{"prompt": p, **v} for p, v in rows[d]["prompts"].items()]

    served = f"vllm_vs_peft_{dtype_name}" if dtype_name in dtypes else "vllm_vs_peft_float32"
    parity = summary[served]
    effect = min(summary["vllm_adapter_vs_vllm_base"], summary["peft_float32_vs_base"])
    floor = summary[served.replace("vllm_vs_peft", "base_vllm_vs_hf")]
    # vLLM's logprobs come from bf16 logits (steps of 1/16-1/8 nat): "rounding level" = no larger than
    # the no-adapter control's difference (with 50% slack), and well below the adapters' effect
    holds = parity <= 1.5 * floor + 1e-3 and parity * 5 < effect and mismatched_ids == 0
    result = {
        "command": "python -m benchmarks.adapter_parity",
        "commit": git_commit(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vllm_served_dtype": dtype_name,
        "top_k": TOP_K,
        "server_phase_s": round(serve_s, 1),
        "summary_max_abs_logprob_diff": summary,
        "prompt_token_id_mismatches": mismatched_ids,
        "verdict": ("holds" if holds else "does not hold")
        + f": max |vLLM - peft({dtype_name if dtype_name in dtypes else 'float32'})| = {parity:.2e} vs adapter-vs-base >= {effect:.2e}"
        + f", no-adapter control |vLLM base - transformers base| = {floor:.2e}"
        " (criterion: parity <= 1.5x control and < effect/5, prompt ids equal)",
        "base_model_control": base_rows,
        "descriptions": [{"description": d, **rows[d]} for d in DESCRIPTIONS],
    }
    OUT.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: result[k] for k in ("vllm_served_dtype", "summary_max_abs_logprob_diff", "verdict")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
