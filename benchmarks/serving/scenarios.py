"""The scenarios, all against one server in one run, in the order they run.

1. warm-up (not measured): base, the preloaded oracle, one oracle load, one generation;
2. single requests, interleaved sample by sample so drift hits all alike: base model,
   oracle preloaded (`--lora-modules`), oracle first use (load endpoint, from disk), the same
   oracle loaded, generated cold (new description: generate + publish + load + first token),
   generated warm (the same description again);
3. evicted: cycle more adapters than vLLM's CPU cache holds (`--max-cpu-loras`), then ask
   for a generated adapter (vLLM reloads it from the store's folder) and an oracle (reloaded
   from its folder);
4. burst: an unmeasured burst over loaded adapters (vLLM compiles kernels for batch shapes it
   has not seen), then `burst_size` new descriptions at once (the generator batches them), and
   as a reference `burst_size` oracles on first use at once;
5. steady state: `steady_adapters` generated adapters, all loaded, under concurrent load,
   against the same number of loaded oracles; alternating rounds;
6. mixed stream at each concurrency: requests drawn Zipf-like from a pool, a share of them
   new; the generated arm and the oracle arm replay the same stream.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable

import openai
from tqdm import tqdm

from benchmarks.serving.client import Job, RequestRecord, load_adapter, run_jobs, run_request
from benchmarks.serving.oracles import Oracle
from benchmarks.serving.workload import DescriptionSource, Workload, mixed_stream


@dataclass
class BenchConfig:
    """Counts and shapes of the run (defaults are small, for a 2-core CPU)."""

    n_single: int = 6                # samples per single-request scenario
    max_tokens: int = 16             # output tokens of single, burst and evicted requests
    warmup: int = 2
    burst_size: int = 32
    steady_adapters: int = 8
    steady_concurrency: int = 16
    steady_requests: int = 32        # per round and arm
    steady_rounds: int = 2
    steady_max_tokens: int = 32
    mixed_concurrency: tuple[int, ...] = (1, 4, 16, 64)
    mixed_requests_per_client: int = 2
    mixed_min_requests: int = 8
    mixed_max_requests: int = 128
    mixed_pool: int = 16
    mixed_new_share: float = 0.25
    mixed_zipf_s: float = 1.1
    mixed_max_tokens: int = 16
    max_loras: int = 8               # must match the server's --max-loras / --max-cpu-loras
    max_cpu_loras: int = 8
    seed: int = 0
    skip: tuple[str, ...] = ()       # phases to leave out: single, evicted, burst, steady, mixed

    def mixed_requests(self, concurrency: int) -> int:
        n = max(self.mixed_min_requests, self.mixed_requests_per_client * concurrency)
        return min(n, self.mixed_max_requests)

    @property
    def cycle_size(self) -> int:
        """Distinct other adapters touched to push one out of vLLM's CPU LRU cache."""
        return self.max_cpu_loras + 1

    def oracles_needed(self) -> int:
        """Exactly how many oracles the run loads: preloaded, warm-up, first use, the loaded set
        (eviction cycle, steady state, pool), burst, and the mixed streams' new ones."""
        loaded = max(self.cycle_size if "evicted" not in self.skip else 0,
                     self.max_loras if "burst" not in self.skip else 0,  # the burst's warm-up
                     self.steady_adapters if "steady" not in self.skip else 0,
                     self.mixed_pool if "mixed" not in self.skip else 0)
        first_use = self.n_single if ("single" not in self.skip or "evicted" not in self.skip) else 0
        burst = self.burst_size if "burst" not in self.skip else 0
        new_mixed = 0 if "mixed" in self.skip else sum(
            sum(1 for s in self.mixed_stream(k, c) if s < 0) for k, c in enumerate(self.mixed_concurrency))
        return 1 + 1 + first_use + loaded + burst + new_mixed

    def mixed_stream(self, level: int, concurrency: int) -> list[int]:
        """The mixed stream of the `level`-th concurrency (see `workload.mixed_stream`)."""
        return mixed_stream(self.mixed_requests(concurrency), self.mixed_pool, self.mixed_new_share,
                            self.mixed_zipf_s, self.seed + level)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Phase:
    """Records of one measured phase (a scenario, or one arm at one concurrency)."""

    name: str
    records: list[RequestRecord]
    wall_s: float | None = None      # for closed-loop phases: wall time of the whole phase
    params: dict = field(default_factory=dict)


class Bench:
    """Runs the scenarios against one server and collects the phases."""

    def __init__(self, client: openai.AsyncOpenAI, base_name: str, preloaded: Oracle,
                 oracles: list[Oracle], workload: Workload, cfg: BenchConfig, run_tag: str):
        self.client = client
        self.base_name = base_name
        self.preloaded = preloaded
        self._fresh_oracles = list(oracles)  # never loaded yet; taken from the front
        self.workload = workload
        self.cfg = cfg
        self.descriptions = DescriptionSource(workload.descriptions, run_tag)
        self.phases: list[Phase] = []
        self.setup_errors: list[dict] = []
        self.failed_phases: list[dict] = []  # a phase that raised: {"phase", "error"} (the run ends there)
        self.load_rtt: list[float] = []
        self.t0 = time.perf_counter()
        self._prompt_i = 0

    # -- helpers ---------------------------------------------------------------------------

    def prompt(self) -> str:
        p = self.workload.prompts[self._prompt_i % len(self.workload.prompts)]
        self._prompt_i += 1
        return p

    def take_oracles(self, n: int) -> list[Oracle]:
        if n > len(self._fresh_oracles):
            raise RuntimeError(f"ran out of oracle adapters ({n} more needed); raise the count")
        out, self._fresh_oracles = self._fresh_oracles[:n], self._fresh_oracles[n:]
        return out

    async def one(self, job: Job, scenario: str, max_tokens: int | None = None) -> RequestRecord:
        return await run_request(self.client, job, scenario, max_tokens or self.cfg.max_tokens, self.t0)

    async def touch(self, models: list[str], max_tokens: int = 1, concurrency: int = 1) -> None:
        """Unmeasured requests that make vLLM use (load) each model once.

        A failed one is retried once (and the failure kept in `setup_errors` for the results);
        a second failure stops the run.
        """
        jobs = [Job(m, self.prompt()) for m in models]
        recs, _ = await run_jobs(self.client, jobs, concurrency, "setup", max_tokens, self.t0)
        bad = [r for r in recs if r.error]
        self.setup_errors += [{"model": r.model[:100], "error": r.error} for r in bad]
        if bad:
            retry = [Job(r.model, self.prompt()) for r in bad]
            recs, _ = await run_jobs(self.client, retry, concurrency, "setup", max_tokens, self.t0)
            bad = [r for r in recs if r.error]
            if bad:
                raise RuntimeError(f"{len(bad)} set-up requests failed twice, first: {bad[0].model[:60]!r}: {bad[0].error}")

    async def load_oracles(self, oracles: list[Oracle]) -> None:
        for o in oracles:
            await load_adapter(self.client, o.name, o.path)

    def add(self, name: str, records: list[RequestRecord], wall_s: float | None = None, **params) -> None:
        self.phases.append(Phase(name, records, wall_s, params))

    # -- scenarios -------------------------------------------------------------------------

    async def warmup(self) -> None:
        c = self.cfg
        await self.touch([self.base_name] * c.warmup + [self.preloaded.name] * c.warmup, c.max_tokens)
        o = self.take_oracles(1)[0]
        await self.one(Job(o.name, self.prompt(), load_path=o.path), "warmup")
        await self.touch(self.descriptions.take(1), c.max_tokens)
        await self.load_endpoint_rtt()

    async def load_endpoint_rtt(self, n: int = 20) -> None:
        """Round trip of the load endpoint when it loads nothing (the name is already loaded:
        vLLM answers 400 at once). Oracle first use pays this on top of the load itself, a
        generated adapter does not (its load happens inside the chat request)."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            try:
                await load_adapter(self.client, self.preloaded.name, self.preloaded.path)
            except openai.BadRequestError:
                times.append(time.perf_counter() - t)
        self.load_rtt = times

    async def single(self) -> None:
        """Base, oracle preloaded / first use / loaded, generated cold / warm; interleaved."""
        c = self.cfg
        names = ["base", "oracle_preloaded", "oracle_first_use", "oracle_loaded", "generated_cold",
                 "generated_warm"]
        recs: dict[str, list[RequestRecord]] = {n: [] for n in names}
        self.cold_descriptions = self.descriptions.take(c.n_single)
        self.first_use_oracles = self.take_oracles(c.n_single)
        for i in tqdm(range(c.n_single), desc="single requests", unit="sample"):
            d, o = self.cold_descriptions[i], self.first_use_oracles[i]
            p = self.prompt()
            recs["base"].append(await self.one(Job(self.base_name, p), "base"))
            recs["oracle_preloaded"].append(await self.one(Job(self.preloaded.name, p), "oracle_preloaded"))
            recs["oracle_first_use"].append(await self.one(Job(o.name, p, load_path=o.path), "oracle_first_use"))
            recs["oracle_loaded"].append(await self.one(Job(o.name, p), "oracle_loaded"))
            recs["generated_cold"].append(await self.one(Job(d, p, tag="new"), "generated_cold"))
            recs["generated_warm"].append(await self.one(Job(d, p), "generated_warm"))
        for n in names:
            self.add(n, recs[n], concurrency=1)

    async def evicted(self) -> None:
        """Generated and oracle adapters that vLLM has dropped from its CPU cache."""
        c = self.cfg
        if not getattr(self, "cold_descriptions", None):
            self.cold_descriptions = self.descriptions.take(c.n_single)
            await self.touch(self.cold_descriptions)
            self.first_use_oracles = self.take_oracles(c.n_single)
            await self.load_oracles(self.first_use_oracles)
        cycle = await self.ensure_loaded(c.cycle_size)
        gen, orc = [], []
        for i in tqdm(range(c.n_single), desc="evicted", unit="sample"):
            await self.touch([o.name for o in cycle])  # pushes everything else out of the LRU
            p = self.prompt()
            g_job = Job(self.cold_descriptions[i], p)
            o_job = Job(self.first_use_oracles[i].name, p)
            first, second = ((g_job, gen, "generated_evicted"), (o_job, orc, "oracle_evicted"))[:: 1 if i % 2 == 0 else -1]
            first[1].append(await self.one(first[0], first[2]))
            second[1].append(await self.one(second[0], second[2]))
        self.add("generated_evicted", gen, concurrency=1, cycled=c.cycle_size)
        self.add("oracle_evicted", orc, concurrency=1, cycled=c.cycle_size)

    async def ensure_loaded(self, n: int) -> list[Oracle]:
        """`n` oracles loaded once and shared by the eviction cycle, steady state and pool."""
        if not hasattr(self, "_loaded"):
            self._loaded: list[Oracle] = []
        if len(self._loaded) < n:
            more = self.take_oracles(n - len(self._loaded))
            await self.load_oracles(more)
            self._loaded += more
        return self._loaded[:n]

    async def burst(self) -> None:
        """`burst_size` new descriptions at once; then `burst_size` new oracles at once."""
        c = self.cfg
        # Warm-up, not measured: the burst's concurrency and token counts over loaded adapters,
        # as many distinct ones as a batch holds. vLLM JIT-compiles its Triton LoRA kernels for
        # batch shapes it has not seen yet; on the H100 run of 2026-11-23 (no warm-up) that
        # stalled whichever burst came first by ~4 s ("Triton kernel JIT compilation during
        # inference: _lora_shrink_kernel" in the server log).
        warm = await self.ensure_loaded(c.max_loras)
        await self.touch([warm[i % len(warm)].name for i in range(c.burst_size)], c.max_tokens, c.burst_size)
        self.burst_descriptions = self.descriptions.take(c.burst_size)
        jobs = [Job(d, self.prompt(), tag="new") for d in self.burst_descriptions]
        recs, wall = await run_jobs(self.client, jobs, c.burst_size, "generated_burst", c.max_tokens, self.t0)
        self.add("generated_burst", recs, wall, concurrency=c.burst_size)
        oracles = self.take_oracles(c.burst_size)
        jobs = [Job(o.name, self.prompt(), load_path=o.path) for o in oracles]
        recs, wall = await run_jobs(self.client, jobs, c.burst_size, "oracle_burst", c.max_tokens, self.t0)
        self.add("oracle_burst", recs, wall, concurrency=c.burst_size)

    async def steady(self) -> None:
        """Output tokens/s with `steady_adapters` generated adapters active vs as many oracles."""
        c = self.cfg
        have = list(getattr(self, "cold_descriptions", [])) + list(getattr(self, "burst_descriptions", []))
        if len(have) < c.steady_adapters:
            extra = self.descriptions.take(c.steady_adapters - len(have))
            await self.touch(extra, concurrency=len(extra))
            have += extra
        gen_models = have[: c.steady_adapters]
        orc_models = [o.name for o in (await self.ensure_loaded(c.steady_adapters))]
        for r in tqdm(range(c.steady_rounds), desc="steady state", unit="round"):
            for arm, models in (("oracle", orc_models), ("generated", gen_models))[:: 1 if r % 2 == 0 else -1]:
                await self.touch(models, concurrency=len(models))  # (re)load all before timing
                jobs = [Job(models[i % len(models)], self.prompt()) for i in range(c.steady_requests)]
                recs, wall = await run_jobs(self.client, jobs, c.steady_concurrency, f"steady_{arm}",
                                            c.steady_max_tokens, self.t0)
                self.add(f"steady_{arm}", recs, wall, round=r, concurrency=c.steady_concurrency,
                         adapters=len(models))

    async def mixed(self) -> None:
        """Zipf-like mixed streams at each concurrency, the generated and the oracle arm in turn
        (which goes first alternates with the level, as in the other paired phases: a level's
        first arm pays what a new batch shape costs vLLM once, e.g. its kernels' compilation)."""
        c = self.cfg
        pool_d = self.descriptions.take(c.mixed_pool)
        await self.touch(pool_d, concurrency=min(len(pool_d), c.max_loras))
        pool_o = [o.name for o in (await self.ensure_loaded(c.mixed_pool))]
        for k, conc in enumerate(c.mixed_concurrency):
            stream = c.mixed_stream(k, conc)
            n = len(stream)
            n_new = sum(1 for s in stream if s < 0)
            new_d = iter(self.descriptions.take(n_new))
            new_o = iter(self.take_oracles(n_new))
            prompts = [self.prompt() for _ in stream]
            gen_jobs, orc_jobs = [], []
            for s, p in zip(stream, prompts):
                if s < 0:
                    gen_jobs.append(Job(next(new_d), p, tag="new"))
                    o = next(new_o)
                    orc_jobs.append(Job(o.name, p, tag="new", load_path=o.path))
                else:
                    gen_jobs.append(Job(pool_d[s], p, tag="pool"))
                    orc_jobs.append(Job(pool_o[s], p, tag="pool"))
            for arm, jobs in (("generated", gen_jobs), ("oracle", orc_jobs))[:: 1 if k % 2 == 0 else -1]:
                tqdm.write(f"mixed stream: {arm}, concurrency {conc}, {n} requests ({n_new} new)")
                recs, wall = await run_jobs(self.client, jobs, conc, f"mixed_{arm}", c.mixed_max_tokens, self.t0)
                self.add(f"mixed_{arm}", recs, wall, concurrency=conc, requests=n, new=n_new,
                         pool=c.mixed_pool, zipf_s=c.mixed_zipf_s, new_share=c.mixed_new_share)

    async def run_all(self, stop: asyncio.Event | None = None) -> list[Phase]:
        """Warm up, then every phase not skipped, in order. Once `stop` is set (see
        `stop_on_sigint`) no further phase starts; the one running is cancelled and what it had
        recorded stays in `phases`."""
        order = ["single", "evicted", "burst", "steady", "mixed"]
        await self.warmup()
        await run_phases([(n, getattr(self, n)) for n in order if n not in self.cfg.skip], stop or asyncio.Event(),
                         self.failed_phases)
        return self.phases


async def run_phases(phases: list[tuple[str, Callable[[], Awaitable[None]]]], stop: asyncio.Event,
                     failed: list[dict] | None = None) -> list[str]:
    """Run the phases one after another until `stop` is set: the running phase is then cancelled
    and no other starts (a cancellation swallowed inside it just lets it finish). A phase that
    fails is recorded in `failed` ({"phase", "error"}) and ends the run as `stop` does, so that
    the phases before it are kept (with `failed` None it raises). Returns the names of the phases
    that ran to the end."""
    done: list[str] = []
    for name, phase in phases:
        if stop.is_set():
            break
        t = time.perf_counter()
        task = asyncio.ensure_future(phase())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            tqdm.write(f"phase {name} stopped after {time.perf_counter() - t:.1f} s")
            break
        error = task.exception()
        if error is not None:  # a phase's own error ends the run
            if failed is None:
                raise error
            failed.append({"phase": name, "error": f"{type(error).__name__}: {error}"})
            tqdm.write(f"phase {name} failed after {time.perf_counter() - t:.1f} s: {type(error).__name__}: {error}")
            stop.set()
            break
        done.append(name)
        tqdm.write(f"phase {name} done in {time.perf_counter() - t:.1f} s")
    return done


def stop_on_sigint(stop: asyncio.Event) -> None:
    """In the running event loop: the first SIGINT sets `stop` (the run ends at the running phase
    and writes what finished), a second one interrupts as usual."""
    loop = asyncio.get_running_loop()

    def first() -> None:
        tqdm.write("SIGINT: stopping after the running phase is cancelled; again to interrupt at once")
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, first)
