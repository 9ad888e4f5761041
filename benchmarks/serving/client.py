"""The clients: streaming chat requests through the OpenAI API, timed from the client side.

A request's clock starts before anything is sent. Time to first token (TTFT) stops at the
first streamed chunk with a choice: vLLM sends it (the assistant role, then the text) once the
engine has produced the first token, so a first token that decodes to no text still counts.
End-to-end latency (E2E) stops when the stream ends.
Greedy decoding with `ignore_eos` (a vLLM extension) makes every request produce exactly
`max_tokens` tokens, so throughput compares like with like across adapters.

Where a scenario first has to load an adapter through vLLM's `/v1/load_lora_adapter`
endpoint (an oracle on first use), that call runs inside the request's clock, as a client of
a deployment with trained adapters would see it; its own duration is kept in `pre_s`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

import openai


@dataclass(frozen=True)
class Job:
    """One request to make."""

    model: str                      # served name: base model, LoRA name, or a task description
    prompt: str
    tag: str = ""                   # free label, e.g. "new" / "pool" in the mixed stream
    load_path: str | None = None    # load this adapter folder as `model` first (load endpoint)


@dataclass
class RequestRecord:
    """What one request measured. Times in seconds; `start` is relative to the run's t0."""

    scenario: str
    model: str
    tag: str
    start: float
    wall_start: float = 0.0         # time.time() at start, to match server-side timestamps
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    pre_s: float | None = None      # load-endpoint call, already inside ttft and e2e
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            del d["extra"]
        return d


def make_client(base_url: str, timeout_s: float, admin_key: str | None = None) -> openai.AsyncOpenAI:
    """An AsyncOpenAI client for a vLLM server at `base_url` (…/v1), no retries.

    Retries would hide failures and fold two attempts into one latency. `admin_key` goes in the
    ``X-LoRAGen-Admin-Key`` header of every request: `loragen-vllm serve` opens vLLM's
    ``/v1/load_lora_adapter`` (how the oracle rows load their adapters) only to requests with it.
    """
    headers = {"X-LoRAGen-Admin-Key": admin_key} if admin_key else None
    return openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", timeout=timeout_s, max_retries=0,
                              default_headers=headers)


async def load_adapter(client: openai.AsyncOpenAI, name: str, path: str) -> None:
    """POST /v1/load_lora_adapter {lora_name, lora_path}; raises on a non-2xx answer."""
    await client.post("/load_lora_adapter", cast_to=str, body={"lora_name": name, "lora_path": path})


async def run_request(
    client: openai.AsyncOpenAI, job: Job, scenario: str, max_tokens: int, t0: float
) -> RequestRecord:
    """Send one streaming chat request and time it; errors are recorded, never raised."""
    t_start = time.perf_counter()
    rec = RequestRecord(scenario=scenario, model=job.model, tag=job.tag, start=t_start - t0,
                        wall_start=time.time())
    try:
        if job.load_path is not None:
            await load_adapter(client, job.model, job.load_path)
            rec.pre_s = time.perf_counter() - t_start
        stream = await client.chat.completions.create(
            model=job.model,
            messages=[{"role": "user", "content": job.prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks_with_text = 0
        async for chunk in stream:
            if chunk.choices:
                if rec.ttft is None:
                    rec.ttft = time.perf_counter() - t_start
                if chunk.choices[0].delta.content:
                    chunks_with_text += 1
            if chunk.usage is not None:
                rec.output_tokens = chunk.usage.completion_tokens
                rec.prompt_tokens = chunk.usage.prompt_tokens
        rec.e2e = time.perf_counter() - t_start
        if not rec.output_tokens:
            rec.output_tokens = chunks_with_text  # no usage chunk: one chunk ~ one token
        if rec.ttft is None:
            rec.error = "stream ended without a choice"
    except openai.APIStatusError as e:
        rec.error = f"HTTP {e.status_code}: {str(e.message)[:300]}"
    except Exception as e:  # timeouts, dropped connections: a benchmark records, not crashes
        rec.error = f"{type(e).__name__}: {str(e)[:300]}"
    return rec


async def run_jobs(
    client: openai.AsyncOpenAI, jobs: list[Job], concurrency: int, scenario: str,
    max_tokens: int, t0: float,
) -> tuple[list[RequestRecord], float]:
    """Closed loop: `concurrency` clients take jobs in order until none are left.

    Returns the records (in job order) and the phase's wall time in seconds.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    records: list[RequestRecord | None] = [None] * len(jobs)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            records[i] = await run_request(client, jobs[i], scenario, max_tokens, t0)

    t_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
    return [r for r in records if r is not None], time.perf_counter() - t_start
