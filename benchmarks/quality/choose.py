"""Serving choices made on the validation split: the sampler setting, the system prompt, the checkpoint.

Candidates are generation files of validation tasks: `loragen_g<guidance>_s<steps>.jsonl` (sampler
settings) and `loragen_sys.jsonl` (the checkpoint's sampler, with the description also as the
system prompt). The chosen sampler is the one with the best mean exact match over the validation
tasks (ties: the checkpoint's own setting, then fewer steps); the system prompt is chosen if
`loragen_sys` beats the checkpoint's own setting without it. The sampler is written into the
checkpoint's config (a new fingerprint) so that serving and the test rows use it. With
``system_prompt_fixed`` every sampler row was generated with the system prompt (as `serve` runs
by default) and only the sampler is chosen.

`choose_checkpoint` picks among whole checkpoints (e.g. the shipped one and SFT-trained ones), each
scored on validation as served: the candidate with the best mean exact match wins; ties go to the
first candidate (the incumbent).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from generator.data.sni import Task, TaskSplits, exact_match, split_instances

from .score import read_row

ROW_RE = re.compile(r"^loragen_g(?P<g>[0-9.]+)_s(?P<s>[0-9]+)$")


def _validation_em(path: Path, tasks: dict[str, Task], splits: TaskSplits) -> tuple[str, float, int]:
    """(row name, mean exact match over the validation tasks answered, how many were answered)."""
    meta, answers = read_row(path)
    refs = {n: split_instances(tasks[n])[1] for n in splits.validation if n in tasks}
    per_task: dict[str, list[float]] = {}
    for a in answers:
        if a["task"] in refs:
            per_task.setdefault(a["task"], []).append(exact_match(a["pred"], refs[a["task"]][a["i"]].outputs))
    if not per_task:
        raise ValueError(f"{path}: no validation task answered")
    return meta["row"], sum(sum(v) / len(v) for v in per_task.values()) / len(per_task), len(per_task)


def choose(folder: str | Path, tasks: dict[str, Task], splits: TaskSplits, checkpoint: str | Path,
           out: str | Path, system_prompt_fixed: bool = False) -> dict:
    """Pick the setting (see module docstring), write it into `checkpoint`, return and save the record."""
    from benchmarks.provenance import provenance
    from generator.api import Generator

    gen = Generator.load(checkpoint)
    default = (float(gen.sampler["guidance"]), int(gen.sampler["steps"]))
    samplers: dict[tuple[float, int], float] = {}
    for path in sorted(Path(folder).glob("loragen_g*_s*.jsonl")):
        row, em, _ = _validation_em(path, tasks, splits)
        m = ROW_RE.match(row)
        if m:
            samplers[(float(m["g"]), int(m["s"]))] = em
    if not samplers:
        raise ValueError(f"no sampler candidates (loragen_g<G>_s<S>.jsonl) in {folder}")
    best = max(samplers, key=lambda k: (round(samplers[k], 6), k == default, -k[1]))
    sys_path = Path(folder) / "loragen_sys.jsonl"
    if system_prompt_fixed and sys_path.is_file():
        raise ValueError(f"{sys_path}: with the system prompt fixed every sampler row has it; no loragen_sys row")
    sys_em = _validation_em(sys_path, tasks, splits)[1] if sys_path.is_file() else None
    plain_em = samplers.get(default)
    system_prompt = system_prompt_fixed or (sys_em is not None and plain_em is not None and sys_em > plain_em)
    before = gen.fingerprint
    if best != default:
        gen = gen.with_sampler(guidance=best[0], steps=best[1])
        gen.save(checkpoint)
    record = {
        "guidance": best[0], "steps": best[1], "system_prompt": system_prompt,
        "system_prompt_fixed": system_prompt_fixed,
        "validation_em": {f"g{g}_s{s}": round(v, 2) for (g, s), v in sorted(samplers.items())},
        "validation_em_system_prompt": None if sys_em is None else round(sys_em, 2),
        "checkpoint_default": {"guidance": default[0], "steps": default[1]},
        "fingerprint_before": before, "fingerprint": gen.fingerprint,
        "validation_tasks": len(splits.validation),
        **provenance(),
    }
    Path(out).write_text(json.dumps(record, indent=1))
    return record


def choose_checkpoint(folder: str | Path, candidates: dict[str, str], tasks: dict[str, Task], splits: TaskSplits,
                      out: str | Path) -> dict:
    """candidates: validation row name -> checkpoint folder, the incumbent first. Saves and returns the record."""
    from benchmarks.provenance import provenance
    from generator.api import Generator

    if not candidates:
        raise ValueError("no candidates")
    scored = {row: _validation_em(Path(folder) / f"{row}.jsonl", tasks, splits) for row in candidates}
    counts = {n for _, _, n in scored.values()}
    if len(counts) != 1:
        raise ValueError(f"the candidates answered different numbers of validation tasks: {sorted(counts)}")
    scores = {row: em for row, (_, em, _) in scored.items()}
    first = next(iter(candidates))
    best = max(scores, key=lambda r: (round(scores[r], 6), r == first))
    record = {
        "chosen": best, "checkpoint": candidates[best], "fingerprint": Generator.load(candidates[best]).fingerprint,
        "validation_em": {r: round(v, 2) for r, v in scores.items()},
        "candidates": candidates, "validation_tasks": counts.pop(),
        "rule": "best mean validation exact match; ties: the first candidate (the incumbent)",
        **provenance("python -m benchmarks.quality choose-checkpoint " + " ".join(
            f"--candidate {r}={c}" for r, c in candidates.items())),
    }
    Path(out).write_text(json.dumps(record, indent=1))
    return record
