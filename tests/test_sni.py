"""The SNI data in the repo: splits (deterministic, the committed sizes), prompts, metrics, task-file
errors, and the scores and choices made from generation files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from generator.data.sni import (
    exact_match,
    load_splits,
    load_sni_task,
    load_tasks,
    normalize_answer,
    rouge_l,
    split_descriptions,
    split_instances,
    num_test_instances,
)
from generator.training.prompts import chat_messages

from .fixtures_generator import synthetic_library, tiny_generator_ckpt  # noqa: F401  (fixtures)

TASKS = Path(__file__).resolve().parents[1] / "data" / "sni" / "tasks"


@pytest.fixture(scope="module")
def tasks():
    return load_tasks(TASKS)


def test_instance_split_sizes_and_determinism(tasks):
    assert len(tasks) >= 100
    for t in tasks:
        train, test = split_instances(t)
        n = len(t.instances)
        assert len(test) == (40 if n >= 80 else n // 2)
        assert len(train) + len(test) == n
        assert sorted(map(repr, train + test)) == sorted(map(repr, t.instances))  # a partition
        again = split_instances(load_sni_task(TASKS / f"{t.name}.json"))
        assert again == (train, test)
    assert num_test_instances(79) == 39 and num_test_instances(80) == 40 and num_test_instances(263) == 40


def test_description_split_is_disjoint_and_fixed(tasks):
    t = tasks[0]
    train, ev = split_descriptions(t)
    assert len(ev) == 10 and not set(ev) & set(train)
    assert sorted(train + ev) == sorted(t.descriptions)
    assert split_descriptions(t) == (train, ev)


def test_committed_task_splits(tasks):
    splits = load_splits(TASKS)
    names = {t.name for t in tasks}
    assert set(splits.train) | set(splits.validation) | set(splits.test) == names  # every task, once
    assert len(splits.test) >= 60 and len({t.category for t in tasks if t.name in splits.test}) >= 15
    assert len(splits.validation) >= 20
    assert all(len(splits.user_descriptions[n]) == 2 for n in splits.test + splits.validation + splits.train)  # two each
    assert len(splits.in_distribution_eval) >= 24
    assert set(splits.in_distribution_eval) <= set(splits.train)
    assert splits.split_of(splits.test[0]) == "test"


def test_splits_are_checked(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": ["a", "b"], "validation": ["b"], "test": []}))
    with pytest.raises(ValueError, match="'b' is in both 'train' and 'validation'"):
        load_splits(path)
    path.write_text(json.dumps({"train": ["a"], "validation": []}))
    with pytest.raises(ValueError, match="not a valid splits file"):
        load_splits(path)
    path.write_text(json.dumps({"train": ["a"], "validation": [], "test": ["c"], "user_descriptions": {"z": ["x"]}}))
    with pytest.raises(ValueError, match="user descriptions for tasks in no split"):
        load_splits(path)
    path.write_text(json.dumps({"train": ["a"], "validation": [], "test": ["c"], "in_distribution": ["c"]}))
    with pytest.raises(ValueError, match="in-distribution tasks outside the train split"):
        load_splits(path)
    path.write_text(json.dumps({"train": ["a", "b"], "validation": [], "test": ["c"], "in_distribution": ["b"]}))
    assert load_splits(path).in_distribution_eval == ("b",)  # the file's list, not the sha256 order
    path.write_text(json.dumps({"train": ["a"], "validation": [], "test": ["c"]}))
    with pytest.raises(ValueError, match="in no split"):
        load_splits(path).split_of("z")
    path.write_text(json.dumps({"train": ["a"], "validation": [], "test": ["c"],  # `sft --user-style` trains on a's
                                "user_descriptions": {"a": ["Sort  the list."], "c": ["sort the list."]}}))
    with pytest.raises(ValueError, match="evaluation task c is also training task a's"):
        load_splits(path)


def test_prompt_is_the_input_alone():
    assert chat_messages("Capital of Peru?") == [{"role": "user", "content": "Capital of Peru?"}]
    msgs = chat_messages("x", system="Answer with a capital city.")
    assert msgs[0] == {"role": "system", "content": "Answer with a capital city."}


def test_metrics_on_known_strings():
    assert normalize_answer("  The  Cat,   sat! ") == "the cat sat"
    assert exact_match("Paris.", ["Lima", "paris"]) == 100.0
    assert exact_match("Paris is the capital", ["Paris"]) == 0.0
    # LCS 3 of prediction (3 tokens) and reference (6 tokens): P = 1, R = 0.5, F = 2/3.
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    assert rouge_l("dogs", ["a cat", "the dog"]) == pytest.approx(100 * 2 * 0.5 / 1.5)  # stemming: dogs ~ dog


def test_bad_task_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_sni_task(bad)
    bad.write_text(json.dumps({"name": "x", "instances": [{"input": "a", "output": "b"}, {"input": "c", "output": ["d"]}]}))
    with pytest.raises(ValueError, match="instance 0"):
        load_sni_task(bad)
    instances = [{"input": "a", "output": ["b"]}, {"input": "c", "output": ["d"]}]
    bad.write_text(json.dumps({"name": "x", "descriptions": ["Do it.", "Do that.", "Do it."], "instances": instances}))
    with pytest.raises(ValueError, match="'descriptions' repeat one"):
        load_sni_task(bad)
    with pytest.raises(FileNotFoundError):
        load_tasks(tmp_path / "nowhere")


def test_table_scores_from_generation_files(tasks, tmp_path):
    """Scores are means over instances and variants; % of oracle is relative to the oracle row's tasks."""
    from benchmarks.quality.generate import Prompt, write_row
    from benchmarks.quality.score import merge_rows

    splits = load_splits(TASKS)
    by = {t.name: t for t in tasks}
    name = splits.test[0]
    _, test = split_instances(by[name])
    right = [x.outputs[0] for x in test]
    prompts = [Prompt(name, i, "0", []) for i in range(len(test))]
    write_row(tmp_path / "oracle.jsonl", {"row": "oracle", "commit": "c", "machine": "m", "date": "d", "command": "x"}, prompts, right)
    half = [y if i % 2 == 0 else "wrong answer" for i, y in enumerate(right)]
    two = [Prompt(name, i, v, []) for v in ("d0s0", "d1s0") for i in range(len(test))]
    write_row(tmp_path / "loragen.jsonl", {"row": "loragen", "commit": "c", "machine": "m", "date": "d", "command": "x"}, two, right + half)
    q = merge_rows(None, [tmp_path / "oracle.jsonl", tmp_path / "loragen.jsonl"], by, splits)
    assert q["rows"]["oracle"]["per_task"][name]["exact_match"] == 100.0
    expected = 100.0 * (len(test) + (len(test) + 1) // 2) / (2 * len(test))
    assert q["rows"]["loragen"]["per_task"][name]["exact_match"] == pytest.approx(expected, abs=1e-3)
    zs = q["rows"]["loragen"]["test"]
    assert zs["tasks"] == 1 and zs["relative_to_oracle"]["exact_match"] == pytest.approx(expected, abs=0.1)
    assert q["rows"]["loragen"]["in_distribution"] is None  # none of its tasks evaluated
    assert merge_rows(None, [tmp_path], by, splits)["rows"].keys() == {"oracle", "loragen"}  # a folder: its files
    bad = tmp_path / "bad"
    for answers, why in (([0, 0], "instance 0 answered twice"), ([len(test)], f"has {len(test)}"), ([-1], "has")):
        write_row(bad / "x.jsonl", {"row": "x"}, [Prompt(name, i, "0", []) for i in answers], ["y"] * len(answers))
        with pytest.raises(ValueError, match=why):
            merge_rows(None, [bad / "x.jsonl"], by, splits)
    write_row(bad / "x.jsonl", {"row": "x"}, [Prompt(name, 0, "0", [])], [right[0]])  # one instance of 40
    partial = merge_rows(None, [bad / "x.jsonl"], by, splits)["rows"]["x"]
    assert partial["per_task"][name]["partial"] and partial["test"]["partial_tasks"] == 1
    (bad / "x.jsonl").unlink()
    bad.rmdir()
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "oracle.jsonl").write_text((tmp_path / "oracle.jsonl").read_text())
    with pytest.raises(ValueError, match="row 'oracle' is in .* both score"):  # would replace the first silently
        merge_rows(None, [tmp_path, tmp_path / "again"], by, splits)
    other = splits.validation[0]  # the row's validation set, made apart, joins its test set
    _, val = split_instances(by[other])
    write_row(tmp_path / "again" / "oracle.jsonl", {"row": "oracle", "commit": "c", "machine": "m", "date": "d",
              "command": "x"}, [Prompt(other, i, "0", []) for i in range(len(val))], [x.outputs[0] for x in val])
    joined = merge_rows(None, [tmp_path / "oracle.jsonl", tmp_path / "again"], by, splits)["rows"]["oracle"]
    assert joined["per_task"].keys() == {name, other} and joined["validation"]["exact_match"] == 100.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no generation files"):
        merge_rows(None, [tmp_path / "empty"], by, splits)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        merge_rows(None, [tmp_path / "nowhere"], by, splits)


def _validation_row(folder: Path, by: dict, name: str, correct: dict[str, bool], **meta_extra) -> None:
    """A generation file `<folder>/<name>.jsonl` answering each task's test instances right or wrong."""
    from benchmarks.quality.generate import Prompt, write_row

    prompts, preds = [], []
    for task, ok in correct.items():
        _, test = split_instances(by[task])
        prompts += [Prompt(task, i, "d0s0", []) for i in range(len(test))]
        preds += [x.outputs[0] if ok else "wrong answer" for x in test]
    meta = {"row": name, "commit": "c", "machine": "m", "date": "d", "command": "x", **meta_extra}
    write_row(folder / f"{name}.jsonl", meta, prompts, preds)


def test_task_count_curve_places_the_steps_run_at_its_own_task_count(tasks, tmp_path):
    """The denoiser-steps run's last snapshot is the task-count curve's point at the number of tasks
    that run trained on (given, not the train split's size now), beside loragen_n<N> rows; a row
    loragen_n<N>_<variant> (another recipe) is a point of its own, off the curve, labelled and plotted."""
    from benchmarks.quality.curves import curves, plot
    from benchmarks.quality.score import row_label

    splits = load_splits(TASKS)
    by = {t.name: t for t in tasks}
    a, b = splits.validation[:2]
    _validation_row(tmp_path, by, "loragen_n50", {a: False, b: False})
    _validation_row(tmp_path, by, "loragen_dit-100", {a: True, b: False})
    _validation_row(tmp_path, by, "loragen_dit-200", {a: True, b: True})
    _validation_row(tmp_path, by, "loragen_n342", {a: False, b: True})
    _validation_row(tmp_path, by, "loragen_n342_scaled", {a: True, b: True})
    c = curves(str(TASKS), {"validation": tmp_path}, steps_run_tasks=204)
    assert c["steps_run_tasks"] == 204
    assert c["validation"]["tasks"] == {50: 0.0, 204: 100.0, 342: 50.0}
    assert c["validation"]["variants"] == {"scaled": {342: 100.0}}
    assert row_label("loragen_n342_scaled") == \
        "LoRAGen trained on 342 tasks, steps scaled with the task count (1 description per task)"
    plot(c, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert c["validation"]["steps"] == {100: 50.0, 200: 100.0}
    # A loragen_n<N> row of the steps run's own N is that point, not the run's last snapshot.
    assert curves(str(TASKS), {"validation": tmp_path}, steps_run_tasks=342)["validation"]["tasks"][342] == 50.0
    (tmp_path / "loragen_n342.jsonl").unlink()  # by default the run is placed at the train split's size
    default = curves(str(TASKS), {"validation": tmp_path})
    assert default["steps_run_tasks"] == len(splits.train)
    assert default["validation"]["tasks"] == {50: 0.0, len(splits.train): 100.0}


def test_sft_step_curve_from_snapshot_rows(tasks, tmp_path):
    """Rows of an SFT run with snapshots become one curve against SFT steps (the run's last row at
    the step its generations record); SFT rows without snapshots (the incumbent) stay off it and the
    incumbent is the reference line; the plot is written."""
    from benchmarks.quality.curves import curves, plot

    splits = load_splits(TASKS)
    by = {t.name: t for t in tasks}
    a, b = splits.validation[:2]
    _validation_row(tmp_path, by, "incumbent", {a: True, b: False}, sft_step=150)
    _validation_row(tmp_path, by, "loragen_sft_lr3e-4_at50", {a: False, b: False}, sft_step=50)
    _validation_row(tmp_path, by, "loragen_sft_lr3e-4_at100", {a: True, b: True}, sft_step=100)
    _validation_row(tmp_path, by, "loragen_sft_lr3e-4", {a: True, b: False}, sft_step=200)
    c = curves(str(TASKS), {"validation": tmp_path})["validation"]
    assert c["sft"] == {"loragen_sft_lr3e-4": {50: 0.0, 100: 100.0, 200: 50.0}}
    assert c["incumbent"] == 50.0 and c["tasks"] == {} and c["steps"] == {}
    plot({"validation": c}, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_in_distribution_sft_curve_with_its_control_and_the_oracle(tasks, tmp_path):
    """In-distribution rows of an SFT run make its curve, its random-string control rows a curve of
    their own, and the committed oracle row's mean over the tasks answered (not all 32) the
    reference; the plot is written."""
    from benchmarks.quality.curves import curves, plot

    splits = load_splits(TASKS)
    by = {t.name: t for t in tasks}
    a, b, c_ = splits.in_distribution_eval[:3]
    _validation_row(tmp_path, by, "incumbent", {a: False, b: False}, sft_step=0)
    _validation_row(tmp_path, by, "fit_at50", {a: True, b: False}, sft_step=50)
    _validation_row(tmp_path, by, "fit", {a: True, b: True}, sft_step=100)
    _validation_row(tmp_path, by, "fit_at50_random", {a: False, b: False}, sft_step=50)
    table = tmp_path / "quality.json"
    table.write_text(json.dumps({"rows": {"oracle": {"per_task": {
        a: {"exact_match": 80.0}, b: {"exact_match": 40.0}, c_: {"exact_match": 0.0}}}}}))
    c = curves(str(TASKS), {"in_distribution": tmp_path}, oracle_from=table)["in_distribution"]
    assert c["sft"] == {"fit": {50: 50.0, 100: 100.0}, "fit_random": {50: 0.0}}
    assert c["incumbent"] == 0.0 and c["oracle"] == 60.0
    plot({"in_distribution": c}, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_checkpoint_choice_on_validation(tasks, tiny_generator_ckpt, tmp_path):  # noqa: F811
    """The best validation EM wins (by at least a margin, if one is given); a tie goes to the first
    candidate (the incumbent); candidates scored on different task sets, or rows another checkpoint
    generated, are refused."""
    from benchmarks.quality.choose import choose_checkpoint
    from generator import Generator

    splits = load_splits(TASKS)
    by = {t.name: t for t in tasks}
    a, b = splits.validation[:2]
    fp = Generator.load(tiny_generator_ckpt).fingerprint

    def row(name: str, correct: dict[str, bool]) -> None:
        _validation_row(tmp_path, by, name, correct, fingerprint=fp)

    row("incumbent", {a: True, b: False})
    row("better", {a: True, b: True})
    row("same", {a: False, b: True})
    row("partial", {a: True})
    ck = str(tiny_generator_ckpt)
    out = tmp_path / "choice.json"
    rec = choose_checkpoint(tmp_path, {"incumbent": ck, "same": ck, "better": ck}, by, splits, out)
    assert rec["chosen"] == "better" and rec["validation_em"] == {"incumbent": 50.0, "same": 50.0, "better": 100.0}
    assert rec["validation_tasks"] == 2 and json.loads(out.read_text())["commit"]
    assert choose_checkpoint(tmp_path, {"incumbent": ck, "same": ck}, by, splits, out)["chosen"] == "incumbent"
    # With a margin the best must beat the incumbent by that much: +50 EM wins at 50, not at 50.1.
    assert choose_checkpoint(tmp_path, {"incumbent": ck, "better": ck}, by, splits, out, margin=50)["chosen"] == "better"
    rec = choose_checkpoint(tmp_path, {"incumbent": ck, "better": ck}, by, splits, out, margin=50.1)
    assert rec["chosen"] == "incumbent" and rec["margin"] == 50.1 and "+ 50.1" in rec["rule"]
    with pytest.raises(ValueError, match="margin"):
        choose_checkpoint(tmp_path, {"incumbent": ck, "better": ck}, by, splits, out, margin=-1)
    with pytest.raises(ValueError, match="answered different validation tasks"):
        choose_checkpoint(tmp_path, {"incumbent": ck, "partial": ck}, by, splits, out)
    _validation_row(tmp_path, by, "stale", {a: True, b: True}, fingerprint="0" * 64)
    with pytest.raises(ValueError, match="stale row"):
        choose_checkpoint(tmp_path, {"incumbent": ck, "stale": ck}, by, splits, out)


def test_named_labels_choice_on_validation(tasks, tiny_generator_ckpt, tmp_path):  # noqa: F811
    """The named-labels rule: a candidate that loses EM with the descriptions as given is not
    eligible however well it does naming labels; an eligible one wins only by beating the
    incumbent naming labels; otherwise the incumbent stays."""
    from benchmarks.quality.__main__ import main as quality_main
    from benchmarks.quality.choose import choose_named
    from generator import Generator

    splits = load_splits(TASKS)
    by = {t.name: t for t in tasks}
    a, b = splits.validation[:2]
    fp = Generator.load(tiny_generator_ckpt).fingerprint
    plain, named = tmp_path / "plain", tmp_path / "named"
    for name, as_given, naming in (("incumbent", (True, False), (True, False)), ("loses", (False, False), (True, True)),
                                   ("keeps", (False, True), (True, True)), ("ties", (True, False), (False, True))):
        _validation_row(plain, by, name, dict(zip((a, b), as_given)), fingerprint=fp)
        _validation_row(named, by, name, dict(zip((a, b), naming)), fingerprint=fp)
    ck = str(tiny_generator_ckpt)
    out = tmp_path / "choice.json"
    rec = choose_named(plain, named, {"incumbent": ck, "loses": ck, "keeps": ck}, by, splits, out)
    assert rec["eligible"] == ["incumbent", "keeps"] and rec["chosen"] == "keeps"
    assert rec["validation_em_named_labels"] == {"incumbent": 50.0, "loses": 100.0, "keeps": 100.0}
    assert choose_named(plain, named, {"incumbent": ck, "loses": ck, "ties": ck}, by, splits, out)["chosen"] == "incumbent"
    # the edges (2 tasks: EM steps of 50): "loses" is 50 under the incumbent as given, 50 over it naming labels
    pair = {"incumbent": ck, "loses": ck}
    assert choose_named(plain, named, pair, by, splits, out, plain_margin=50.0, named_gain=50.0)["chosen"] == "loses"
    assert choose_named(plain, named, pair, by, splits, out, plain_margin=49.9, named_gain=50.0)["chosen"] == "incumbent"
    assert choose_named(plain, named, pair, by, splits, out, plain_margin=50.0, named_gain=50.1)["chosen"] == "incumbent"
    quality_main(["choose-named", "--tasks", str(TASKS), "--plain", str(plain), "--named", str(named),
                  "--candidate", f"incumbent={ck}", "--candidate", f"keeps={ck}", "--out", str(out)])
    assert json.loads(out.read_text())["chosen"] == "keeps"
    quality_main(["choose-named", "--lever", "user_style", "--tasks", str(TASKS), "--plain", str(plain), "--named",
                  str(named), "--candidate", f"incumbent={ck}", "--candidate", f"keeps={ck}", "--out", str(out)])
    user = json.loads(out.read_text())  # the user-style experiment: the same rule, its own names
    assert user["chosen"] == "keeps" and user["validation_em_user_style"] == {"incumbent": 50.0, "keeps": 100.0}
    assert "user-style descriptions" in user["rule"] and "--lever user_style" in user["command"]
    with pytest.raises(ValueError, match="unknown lever"):
        choose_named(plain, named, pair, by, splits, out, lever="labels")
    with pytest.raises(SystemExit, match="ROW=CHECKPOINT"):
        quality_main(["choose-named", "--tasks", str(TASKS), "--plain", str(plain), "--named", str(named),
                      "--candidate", ck, "--out", str(out)])


def test_sampler_choice_on_validation(tasks, tiny_generator_ckpt, tmp_path):  # noqa: F811
    """The sampler row with the best validation EM is written into the checkpoint (a new
    fingerprint); a tie keeps the checkpoint's own setting; with the system prompt fixed the record
    says so and a separate system-prompt row is refused."""
    import shutil

    from benchmarks.quality.choose import choose
    from generator.api import Generator

    splits = load_splits(TASKS)
    by = {t.name: t for t in tasks}
    a, b = splits.validation[:2]
    ck = tmp_path / "ck"
    shutil.copytree(tiny_generator_ckpt, ck)
    own = Generator.load(ck)
    g0, s0 = float(own.sampler["guidance"]), int(own.sampler["steps"])
    rows = tmp_path / "rows"
    rows.mkdir()

    def row(name: str, correct: dict[str, bool], fingerprint: str = own.fingerprint, system_prompt: bool = True) -> None:
        _validation_row(rows, by, name, correct, fingerprint=fingerprint, system_prompt=system_prompt)

    row(f"loragen_g{g0 + 1}_s{s0}", {a: True, b: True}, fingerprint="0" * 64)  # left from another checkpoint
    with pytest.raises(ValueError, match="a stale row"):
        choose(rows, by, splits, ck, tmp_path / "c0.json", system_prompt_fixed=True)
    row(f"loragen_g{g0 + 1}_s{s0}", {a: True, b: True}, system_prompt=False)
    with pytest.raises(ValueError, match="without the description as system prompt"):
        choose(rows, by, splits, ck, tmp_path / "c0.json", system_prompt_fixed=True)
    row(f"loragen_g{g0}_s{s0}", {a: True, b: False})
    row(f"loragen_g{g0 + 1}_s{s0}", {a: True})  # one task only: 100 against the other's 50
    with pytest.raises(ValueError, match="answered different validation tasks"):
        choose(rows, by, splits, ck, tmp_path / "c0.json", system_prompt_fixed=True)
    assert Generator.load(ck).fingerprint == own.fingerprint  # nothing written
    row(f"loragen_g{g0 + 1}_s{s0}", {a: False, b: True})  # a tie: the checkpoint's own setting stays
    rec = choose(rows, by, splits, ck, tmp_path / "c1.json", system_prompt_fixed=True)
    assert (rec["guidance"], rec["steps"]) == (g0, s0) and rec["fingerprint"] == own.fingerprint
    assert rec["system_prompt"] and rec["system_prompt_fixed"]
    assert rec["date"] and rec["machine"] and rec["command"].startswith("python -m")  # what made it
    row(f"loragen_g{g0 + 2}_s{s0}", {a: True, b: True})
    rec = choose(rows, by, splits, ck, tmp_path / "c2.json", system_prompt_fixed=True)
    assert (rec["guidance"], rec["steps"]) == (g0 + 2, s0) and rec["fingerprint"] != own.fingerprint
    assert Generator.load(ck).sampler["guidance"] == g0 + 2
    row("loragen_sys", {a: True, b: True})
    with pytest.raises(ValueError, match="no loragen_sys row"):
        choose(rows, by, splits, ck, tmp_path / "c3.json", system_prompt_fixed=True)


def test_anchor_blend_pulls_towards_the_nearest_training_descriptions(tasks, tiny_generator_ckpt):  # noqa: F811
    """alpha 1 is the generator as served; alpha 0, k 1 conditions on the nearest training
    description; the blended adapters differ and the row records the blend; bad settings are refused."""
    import torch

    from benchmarks.quality.anchors import AnchorBlend, training_descriptions
    from benchmarks.quality.generate import eval_descriptions, generated_adapters

    anchors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    cond = torch.nn.functional.normalize(torch.tensor([[0.9, 0.3, 0.0]]), dim=1)
    same, top1 = AnchorBlend(1.0).apply(cond, anchors)
    assert torch.allclose(same, cond) and top1.item() == pytest.approx(cond[0, 0].item())
    nearest, _ = AnchorBlend(0.0, k=1).apply(cond, anchors)
    assert torch.allclose(nearest, anchors[:1])
    half, _ = AnchorBlend(0.5, k=2).apply(cond, anchors)
    assert half.norm().item() == pytest.approx(1.0) and half[0, 0] > cond[0, 0]  # pulled towards anchor 0
    for bad in ({"alpha": 1.5}, {"alpha": 0.5, "k": 0}, {"alpha": 0.5, "temperature": 0.0}):
        with pytest.raises(ValueError):
            AnchorBlend(**bad)

    splits = load_splits(TASKS)
    by = {t.name: t for t in tasks}
    val, train = [by[n] for n in splits.validation[:2]], [by[n] for n in splits.train[:5]]
    assert training_descriptions(train) and not set(training_descriptions(train)) & {
        d for t in train for d in eval_descriptions(t)}
    ck = str(tiny_generator_ckpt)

    def made(blend):
        return generated_adapters(ck, val, "description", [0], "cpu", by, blend=blend, anchor_tasks=train)

    plain, slots, _, info = made(None)
    kept, _, _, info1 = made(AnchorBlend(1.0))
    pulled, _, _, info0 = made(AnchorBlend(0.0, k=1))
    assert "anchor_blend" not in info and info0["anchor_blend"]["alpha"] == 0.0
    assert -1.0 <= info0["anchor_blend"]["nearest_cosine_mean"] <= 1.0 and info0["anchor_blend"]["anchors"] > 0
    key = next(iter(slots))
    a_plain, a_kept, a_pulled = (x[slots[key]].A for x in (plain, kept, pulled))
    first = next(iter(a_plain))
    assert torch.allclose(a_plain[first], a_kept[first], atol=1e-5)
    assert not torch.allclose(a_plain[first], a_pulled[first], atol=1e-5)
    with pytest.raises(ValueError, match="training tasks"):
        generated_adapters(ck, val, "description", [0], "cpu", by, blend=AnchorBlend(0.5), anchor_tasks=[])


def test_adapter_scale_multiplies_dw(tasks, tiny_generator_ckpt):  # noqa: F811
    """--adapter-scale S: the same A, S x B (so S x dW), recorded in the row's meta."""
    import torch

    from benchmarks.quality.generate import generated_adapters

    splits = load_splits(TASKS)
    by = {t.name: t for t in tasks}
    val = [by[n] for n in splits.validation[:1]]
    plain, slots, _, info = generated_adapters(str(tiny_generator_ckpt), val, "description", [0], "cpu", by)
    half, _, _, info_half = generated_adapters(str(tiny_generator_ckpt), val, "description", [0], "cpu", by,
                                               adapter_scale=0.5)
    assert "adapter_scale" not in info and info_half["adapter_scale"] == 0.5
    for a, b in zip(plain, half):
        for m in a.A:
            assert torch.equal(a.A[m], b.A[m]) and torch.allclose(a.B[m] * 0.5, b.B[m])
            assert torch.allclose(a.delta(m, 0) * 0.5, b.delta(m, 0), atol=1e-6)


def test_generate_refuses_an_empty_task_selection(tmp_path):
    """`generate` with a task set and --only that share no task says so, instead of failing inside a row."""
    import subprocess
    import sys

    splits = load_splits(TASKS)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "generate", "--tasks", str(TASKS),
                           "--task-set", "in_distribution", "--only", splits.validation[0], "--rows", "base",
                           "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no tasks to answer (--task-set in_distribution and --only have none in common)" in proc.stderr
    assert not (tmp_path / "q" / "base.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["generate", "--tasks", "/nonexistent", "--rows", "base", "--out", "o"], "does not exist"),
    (["score", "--tasks", str(TASKS), "--generations", "/nonexistent"], "no such generation file"),
    (["generate", "--tasks", str(TASKS), "--rows", "foo", "--out", "o"], "need --generator"),
    (["generate", "--tasks", str(TASKS), "--rows", "oracle", "--out", "o"], "need --oracles"),
])
def test_quality_cli_bad_input_is_one_line(args: list[str], message: str) -> None:
    from benchmarks.quality.__main__ import main as quality_main

    with pytest.raises(SystemExit, match=message):
        quality_main(args)

