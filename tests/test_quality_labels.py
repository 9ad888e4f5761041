"""`benchmarks.quality labels`: label sets, answers in and out of them, borrowed labels, naming."""

from __future__ import annotations

import json

import pytest

from benchmarks.quality.labels import label_set, label_use, labels_named, markdown, run
from generator.data.sni import Instance, Task, TaskSplits, normalize_answer, split_instances


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
    majority = max(("positive", "negative"), key=[normalize_answer(x.outputs[0]) for x in split_instances(sentiment)[0]].count)
    assert s["train_majority"] == 100.0 * sum(normalize_answer(x.outputs[0]) == majority for x in test[:8]) / 8
    assert label_set(task("one_label", ["same"] * 10)) is None  # nothing to choose
    named = labels_named(tasks, splits)["test"]
    assert named["definitions"] == [1, 1] and named["user_descriptions"] == [1, 2] and named["descriptions"][0] == 0

    row = tmp_path / "row.jsonl"
    row.write_text("\n".join(json.dumps(x) for x in [{"meta": {"row": "r"}}, *answers]) + "\n")
    result = run(list(tasks.values()), splits, [row])
    assert result["common_tasks"] == ["sentiment"] and result["rows"]["r"]["mean"]["in_label_set"] == 50.0
    assert "| r | 50.0 | 50.0 | 37.5 | 37.5 | `yes` (3) |" in markdown(result)
    both = run(list(tasks.values()), splits, [row, f"again={row}"])  # NAME=FILE names a row
    assert list(both["rows"]) == ["r", "again"] and both["rows"]["again"]["mean"] == both["rows"]["r"]["mean"]
    with pytest.raises(ValueError, match="NAME=FILE"):
        run(list(tasks.values()), splits, [row, row])


def test_choose_labels_picks_the_most_likely_whole_answer() -> None:
    """`choose_labels` (batched, right-padded, the vocabulary projection only at label tokens) picks
    the label a plain full-logits computation of the same score picks, per prompt."""
    import torch

    from benchmarks.quality.generate import Prompt, choose_labels
    from generator.base_model import load_base_model
    from generator.training.prompts import chat_messages, prompt_ids

    model, tok, _ = load_base_model("cpu", dtype=torch.float32)
    labels_of = {"a": ["Yes", "No"], "b": ["positive", "negative", "neutral"]}
    prompts = [Prompt("a", 0, "0", chat_messages("Is the sky blue? Answer Yes or No.")),
               Prompt("b", 0, "0", chat_messages("I loved this film, it was wonderful. Sentiment?")),
               Prompt("a", 1, "0", chat_messages("Is fire cold? Answer Yes or No."))]

    def reference(p: Prompt) -> str:
        ids = prompt_ids(tok, p.messages)
        scores = []
        for label in labels_of[p.task]:
            lab = tok(label, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids + lab])).logits[0].float(), -1)
            scores.append(sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(lab)))
        return labels_of[p.task][max(range(len(scores)), key=scores.__getitem__)]

    expected = [reference(p) for p in prompts]
    for max_tokens in (64, 4096):  # one sequence per batch; all in one right-padded batch
        chosen = choose_labels(model, tok, prompts, labels_of, max_tokens=max_tokens, progress=False)
        assert chosen == expected
    assert all(c in labels_of[p.task] for c, p in zip(chosen, prompts))


def test_label_names_in_a_description() -> None:
    """A closed label set comes from the training instances (most frequent spelling first); the
    sentence naming it lists the labels sorted, so it does not tell which is most frequent."""
    from benchmarks.quality.generate import with_named_labels
    from generator.data.sni import MAX_LABELS, add_label_names, label_strings, train_labels

    t = task("sentiment", ["POS", "pos", "POS", "NEG"] * 30)
    train, _ = split_instances(t)
    assert label_strings(train) == ["POS", "NEG"]
    assert label_strings(task("one", ["yes"] * 10).instances) is None  # nothing to choose
    assert label_strings(task("open", [f"w{i}" for i in range(MAX_LABELS + 1)]).instances) is None
    assert add_label_names("Say whether the review is good", ["POS", "NEG"]) == \
        'Say whether the review is good. Answer with one of: "NEG", "POS".'
    assert add_label_names("Judge it! ", ["b", "A"]) == 'Judge it! Answer with one of: "A", "b".'
    with pytest.raises(ValueError, match="at least 2"):
        add_label_names("Judge it.", ["yes"])
    open_task = task("open", [f"w{i}" for i in range(40)])
    named = with_named_labels(lambda t: ["Classify it.", "Rate it"], train_labels([t, open_task]))
    assert named(t) == ['Classify it. Answer with one of: "NEG", "POS".', 'Rate it. Answer with one of: "NEG", "POS".']
    assert named(open_task) == ["Classify it.", "Rate it"]  # no closed label set: unchanged


@pytest.mark.parametrize("labels", [["NEG", "POS"], ["not religious hate", "religious hate"], ["0", "1", "2"],
                                    ["Ja", "Nein", "Vielleicht"], ["a.b", "c, d"]])
def test_label_names_reads_back_what_add_label_names_writes(labels: list[str]) -> None:
    """`label_names` (what the server parses) inverts `add_label_names`, also after the server's
    normalisation of the description; labels it could not read back are refused when written."""
    from generator.data.sni import add_label_names, label_names
    from loragen_vllm.descriptions import normalize_description

    text = add_label_names("Decide.\n  Be brief", labels)
    assert label_names(text) == sorted(labels, key=lambda s: (s.casefold(), s))
    assert label_names(normalize_description(text)) == label_names(text)


def test_label_names_needs_the_closing_sentence_and_clean_labels() -> None:
    from generator.data.sni import add_label_names, label_names

    for text in ('Answer with one of: "yes".', "Answer with one of: yes, no.", 'Say "yes" or "no".',
                 'Answer with one of: "yes", "no". Then explain.', 'Answer with one of: "yes", "".'):
        assert label_names(text) is None, text
    assert label_names('Answer with one of: "yes", "no".') == ["yes", "no"]  # as written, not sorted
    for bad in (['say "hi"', "no"], ["", "no"], ["two  spaces", "no"], [" padded", "no"], ["line\nbreak", "no"],
                ["e\u0301", "no"]):  # not NFC
        with pytest.raises(ValueError, match="labels must be"):
            add_label_names("Decide.", bad)
