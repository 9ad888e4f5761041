"""`benchmarks.quality labels`: label sets, answers in and out of them, borrowed labels, naming."""

from __future__ import annotations

import json

from benchmarks.quality.labels import label_set, label_use, labels_named, markdown, run
from generator.data.sni import Instance, Task, TaskSplits, split_instances


def task(name: str, outputs: list[str], definition: str = "Answer.") -> Task:
    instances = tuple(Instance(f"{name} input {i}", (o,)) for i, o in enumerate(outputs))
    return Task(name, definition, ("Classification",), ("Say yes or no.",) * 12, instances)


def test_label_use_counts_answers_in_and_out_of_the_label_set(tmp_path) -> None:
    sentiment = task("sentiment", ["Positive", "negative"] * 20, 'Answer "positive" or "negative".')
    yes_no = task("train_yes_no", ["Yes", "No"] * 20)
    free = task("free_text", [f"answer number {i}" for i in range(40)])
    tasks = {t.name: t for t in (sentiment, yes_no, free)}
    splits = TaskSplits(train=("train_yes_no",), validation=(), test=("sentiment", "free_text"),
                        user_descriptions={"sentiment": ("Is this review positive or negative?", "Rate it.")})
    assert label_set(sentiment) == {"positive", "negative"} and label_set(free) is None
    test = split_instances(sentiment)[1]
    preds = [x.outputs[0] for x in test[:4]] + ["yes"] * 3 + ["maybe"]  # 4 right, 3 borrowed, 1 neither
    answers = [{"task": "sentiment", "i": i, "pred": p} for i, p in enumerate(preds)]
    answers += [{"task": "free_text", "i": 0, "pred": "x"}]  # not a closed label set: left out
    use = label_use(answers, tasks, splits)
    assert set(use) == {"sentiment"}
    s = use["sentiment"]
    assert s["n"] == 8 and s["exact_match"] == 50.0 and s["in_label_set"] == 50.0
    assert s["other_tasks_label"] == 37.5 and s["top_answer"] == 37.5 and s["borrowed"] == [("yes", 3)]
    named = labels_named(tasks, splits)["test"]
    assert named["definitions"] == [1, 1] and named["user_descriptions"] == [1, 2] and named["descriptions"][0] == 0

    row = tmp_path / "row.jsonl"
    row.write_text("\n".join(json.dumps(x) for x in [{"meta": {"row": "r"}}, *answers]) + "\n")
    result = run(list(tasks.values()), splits, [row])
    assert result["common_tasks"] == ["sentiment"] and result["rows"]["r"]["mean"]["in_label_set"] == 50.0
    assert "| r | 50.0 | 50.0 | 37.5 | 37.5 | `yes` (3) |" in markdown(result)
