"""A quality row answered by a running ``loragen-vllm serve``: what a client gets (`served`).

`generate` answers with the generator and the base model in one process (Hugging Face, greedy);
this sends the same test inputs as chat requests to the server -- the description as ``model``,
the input as the one user message, greedy (temperature 0), the task's token budget -- so the
server's own path decides the answer: its store and generator, its system prompt (`serve`'s
default: the description), vLLM's sampling and, with ``choice``, vLLM's structured outputs
restricted to the task's labels (``structured_outputs: {"choice": [...]}``; closed-label tasks
only). With ``name_labels`` each description of a closed-label task names its labels
(`generator.data.sni.add_label_names`). Writes a generation file like `generate`'s
(``<out>/<row>.jsonl``; variants ``d<j>``), scored by ``score`` or ``labels``. The row records
the generator fingerprint the server answered with (its ``x-loragen-adapter`` header), how the
server was started (``server``: what the caller says; the server's own label choice, on by
default, constrains the answers of descriptions that name labels whatever the client sends), and
how many answers hit the token budget. Each request has a deadline and the row one in all; a
request that still fails after retries stops the row (nothing is written) and cancels the rest.

    loragen-vllm serve --port 8000 --no-label-choice &
    python -m benchmarks.quality served --tasks data/sni/tasks --task-set validation --closed-only \\
        --name-labels --choice --row served_choice --out runs/served --server "serve --no-label-choice"
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Mapping, Sequence

from tqdm.auto import tqdm

from generator.data.sni import Task, split_instances, train_labels

from .generate import MAX_INPUT_TOKENS, Prompt, descriptions_for, max_new_tokens, run_meta, truncate_text, write_row

DEFAULT_CONCURRENCY = 8
REQUEST_TIMEOUT_S = 300.0  # one request, a new description's generation included
ROW_DEADLINE_S = 4 * 3600.0  # the whole row


async def _answer(client, sem: asyncio.Semaphore, model: str, text: str, max_tokens: int,
                  choice: list[str] | None) -> tuple[str, str | None, bool]:
    """(the server's greedy answer to one input, its x-loragen-adapter header, whether the
    answer hit `max_tokens`); raises on an HTTP error (a row must not hide one)."""
    async with sem:
        extra = {"structured_outputs": {"choice": choice}} if choice else None
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], temperature=0.0, max_tokens=max_tokens,
            extra_body=extra)
        r = raw.parse()
        return ((r.choices[0].message.content or "").strip(), raw.headers.get("x-loragen-adapter"),
                r.choices[0].finish_reason == "length")


async def _run(base_url: str, requests: Sequence[tuple[Prompt, str, str]], budgets: dict[str, int],
               labels: dict[str, list[str]], choice: bool, concurrency: int, deadline_s: float,
               progress: bool) -> list[tuple[str, str | None, bool]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=2)
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(requests), desc="served", disable=not progress)

    async def one(p: Prompt, description: str, text: str) -> tuple[str, str | None, bool]:
        out = await _answer(client, sem, description, text, budgets[p.task], labels.get(p.task) if choice else None)
        bar.update()
        return out

    tasks = [asyncio.ensure_future(one(*r)) for r in requests]
    try:
        return list(await asyncio.wait_for(asyncio.gather(*tasks), deadline_s))
    finally:  # a failure or the deadline: nothing else keeps running
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        await client.close()


def served_row(base_url: str, tasks: Sequence[Task], out: str | Path, row: str, *, name_labels: bool = False,
               choice: bool = False, num_descriptions: int = 2,
               user_descriptions: Mapping[str, Sequence[str]] | None = None, concurrency: int = DEFAULT_CONCURRENCY,
               limit_instances: int | None = None, server: str = "", deadline_s: float = ROW_DEADLINE_S,
               progress: bool = True) -> Path:
    """Answer every test input of `tasks` through the server at `base_url`, once per description
    (`generate.descriptions_for`); write ``<out>/<row>.jsonl`` and return its path. `server`: how the
    server was started (recorded)."""
    from transformers import AutoTokenizer

    from generator.base_model import ensure_base_model

    tok = AutoTokenizer.from_pretrained(ensure_base_model())
    labels = train_labels(tasks)
    descriptions_of = descriptions_for(num_descriptions, user_descriptions, labels if name_labels else None)
    budgets = {t.name: max_new_tokens(tok, t) for t in tasks}
    requests = []  # (what the row records, the description as `model`, the input as the user message)
    for t in tasks:
        _, test = split_instances(t)
        for j, d in enumerate(descriptions_of(t)):
            for i, x in enumerate(test[:limit_instances]):
                requests.append((Prompt(t.name, i, f"d{j}", []), d, truncate_text(tok, x.input, MAX_INPUT_TOKENS)))
    t0 = time.perf_counter()
    answers = asyncio.run(_run(base_url, requests, budgets, labels, choice, concurrency, deadline_s, progress))
    preds = [a[0] for a in answers]
    prompts = [r[0] for r in requests]
    seconds = time.perf_counter() - t0
    generators = sorted({h.rpartition("generator=")[2] for _, h, _ in answers if h and "generator=" in h})
    extra = {"served": {"base_url": base_url, "server": server, "concurrency": concurrency, "client_choice": choice,
                        "truncated": sum(t for _, _, t in answers)},
             "fingerprint": generators[0] if len(generators) == 1 else generators,
             "descriptions": "user" if user_descriptions is not None else "eval"}
    if name_labels:
        extra["name_labels"] = {"tasks": sorted(labels), "labels_from": "the task's training instances"}
    path = Path(out) / f"{row}.jsonl"
    write_row(path, run_meta(row, seconds=round(seconds, 1), prompts=len(prompts), **extra), prompts, preds)
    return path
