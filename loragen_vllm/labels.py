"""The labels a description states, for label choice (`loragen_vllm.middleware`).

Two forms are read:

* The canonical closing sentence ``Answer with one of: "NEG", "POS".``
  (`generator.data.sni.label_names`, written by `add_label_names`).
* Labels in a user's own words, where the wording leaves no doubt what they are
  (`labels_in_words`), all in the description's last sentence (after its last ";"):
  alternatives (``A or B``, ``A, B or C``) ending it after a verb that asks for a label
  (``Answer Yes or No.``, ``Classify the tweet as positive or negative.``) or after a colon that
  follows a word naming labels (``Tell me the sentiment of this review: Positive or
  Negative.``); two alternatives ending a yes/no question, one word each or the second negating
  the first (``Is this tweet positive or negative?``, ``Is this comment Hope Speech or Not Hope
  Speech?``, ``Is this a threat or a non-threat?``); and a bracketed list of single letters or
  digits in a sentence that asks to pick one (``Which option (A, B, C, D or E) ...``).
  Anything less clear states nothing: examples (``like NOUN or VERB``), alternatives inside a
  sentence (``Name a gene or protein mentioned ...``), conditions (``Say yes, or no if you can't
  tell.``), alternatives of different lengths (``present or past tense``), kinds of answer
  (``Answer with a number or a word.``) and clauses (``as having positive or negative
  sentiment``). Yes/no questions about content can still read wrongly (``Does the sentence
  contain a verb or an adjective?`` reads ``verb`` / ``adjective``).

A wrong label set would force wrong answers, so `labels_in_words` errs towards stating nothing.
It runs on the server's event loop for every chat: its regexes have no nested unbounded
repetition, and a last sentence over `MAX_SENTENCE_CHARS` states nothing.
"""

from __future__ import annotations

import re

from generator.data.sni import label_names

MAX_LABEL_WORDS = 3
MAX_LABELS = 10
MAX_SENTENCE_CHARS = 400  # a longer last sentence states no labels (and bounds the regexes' work)

# Words that introduce examples rather than the whole label set ("like NOUN or VERB").
_EXAMPLE_WORDS = {"like", "e.g.", "eg", "such", "including", "example", "examples"}
_ARTICLES = {"a", "an", "the"}
# Words no label has: a phrase with them is a paraphrase or a clause ("its absence", "lacking that quality").
_NOT_IN_LABELS = {"and", "as", "it", "its", "their", "them", "they", "that", "this", "these", "those", "which", "who",
                  "his", "her", "to", "of", "for", "with", "whether", "if", "having", "being", "showing"}
_NO_LABEL_WORDS = _EXAMPLE_WORDS | _NOT_IN_LABELS
_NEGATIONS = ("not ", "non-", "non ", "anti-", "un")
# A yes/no question's first word: such a question ending with alternatives asks for one of them.
_AUXILIARIES = {"is", "are", "was", "were", "does", "do", "did", "can", "could", "should", "would", "will", "has",
                "have"}
# The verb before the alternatives that end the last sentence: the last such verb counts (the
# greedy ".*"). "as" counts only after a verb of labelling (`_LABELLING`) earlier in the sentence.
_LEAD = re.compile(r"^.*(?:^|[\s,])(?P<verb>(?:answer|say|reply|respond)(?:\s+with)?|(?:label|mark|tag)\s+it(?:\s+as)?|as)"
                   r"\s+(?P<alts>[^.:!?]+)[.!]?$", re.IGNORECASE | re.DOTALL)
_LABELLING = re.compile(r"\b(?:classify|label|mark|tag|categori[sz]e|rate|flag)\b", re.IGNORECASE)
# A colon after a word naming labels: "the sentiment of this review: Positive or Negative."
_COLON = re.compile(r"^(?P<head>[^:]*):\s*(?P<alts>[^.:!?]+)[.!]?$", re.DOTALL)
_LABEL_NOUNS = re.compile(r"\b(?:answer|answers|label|labels|sentiment|category|categories|class|classes|options|"
                          r"choices|output|one of)\b", re.IGNORECASE)
_LETTER_LIST = re.compile(r"\(\s*((?:[A-Za-z0-9]\s*,\s*)+[A-Za-z0-9]\s*,?\s+or\s+[A-Za-z0-9])\s*\)")
_PICKING = re.compile(r"^(?:which|what|pick|choose|select|answer|reply)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def stated_labels(description: str) -> list[str] | None:
    """The labels ``description`` states: its canonical closing sentence's, else those in its
    own words (`labels_in_words`); None if it states none."""
    return label_names(description) or labels_in_words(description)


def labels_in_words(description: str) -> list[str] | None:
    """Labels stated in plain words (the forms in the module docstring), in the description's
    order and spelling (articles dropped); None if it states none that clearly."""
    last = _SENTENCE_END.split(description.strip())[-1].split(";")[-1].strip()
    if len(last) > MAX_SENTENCE_CHARS:
        return None
    if (m := _LETTER_LIST.search(last)) and _PICKING.match(last):
        return _checked(_items(m.group(1)) or [])
    if last.endswith("?"):
        clause = re.split(r",\s*", last[:-1])[-1]  # "Based on X, is it A or B?"
        words = clause.split()
        return _question_labels(clause) if words and words[0].lower() in _AUXILIARIES else None
    items = None
    if (m := _LEAD.match(last)) and (m.group("verb").lower() != "as"
                                     or _LABELLING.search(last[:m.start("verb")].split(":")[-1])):
        items = _items(re.sub(r"^either\s+", "", m.group("alts"), flags=re.IGNORECASE))
        if items and m.group("verb").lower() != "as" and _kinds_of_answer(items):
            return None
    elif (m := _COLON.match(last)) and _LABEL_NOUNS.search(m.group("head")):
        items = _items(m.group("alts"))
        if items and _kinds_of_answer(items):
            return None
    if items and len(items) == 2 and items[1].lower() == "not":  # "Label it hope speech or not."
        items[1] = f"not {items[0]}"
    return _checked(items) if items else None


def _kinds_of_answer(items: list[str]) -> bool:
    """"a number or a word", "a short summary or an empty string": kinds of answer, not labels."""
    return any(len(i.split()) > 1 and i.split()[0].lower() in _ARTICLES for i in items)


def _items(alts: str) -> list[str] | None:
    """``A or B`` / ``A, B or C`` / ``A, B, or C`` split into its items; None if there is not
    exactly one "or"."""
    parts = re.split(r"\s+or\s+", alts.strip(), flags=re.IGNORECASE)
    if len(parts) != 2:
        return None
    left = [item.strip() for item in parts[0].split(",") if item.strip()]
    return [*left, parts[1].strip()] if left else None


def _question_labels(question: str) -> list[str] | None:
    """The two alternatives ending a yes/no question (without its "?"): one word each, or the
    second negating the first (``Hope Speech or Not Hope Speech``). A bare ``..., A or B?`` after
    a comma states nothing: in ``Is the review positive, negative or neutral?`` it would drop a
    label."""
    items = _items(question)
    if items is None or len(items) != 2:  # "..., A, B or C?" may be an apposition: "correct, True or False?"
        return None
    head, last = items[0].split(), _strip_article(items[1])
    if last.lower() == "not":  # "Is this hope speech or not?": where the first one starts is unclear
        return None
    first = _negated_core(last)
    if first is not None and [w.lower() for w in head[-len(first.split()):]] != [w.lower() for w in first.split()]:
        first = None
    if first is None and len(last.split()) > 1:  # "present or past tense": where the first one starts is unclear
        return None
    n = len((first or last).split())
    first = " ".join(head[-n:])
    before = [w.lower() for w in head[:-n] if w.lower() not in _ARTICLES]  # (the clause has no commas)
    if len(before) < 2 or before[-1] in _EXAMPLE_WORDS:  # the auxiliary and a subject at least
        return None
    return _checked([first, last])


def _negated_core(label: str) -> str | None:
    """``Hope Speech`` for ``Not Hope Speech`` (``threat`` for ``non-threat``); None if
    ``label`` negates nothing."""
    low = label.lower()
    for neg in _NEGATIONS:
        if low.startswith(neg) and len(low) > len(neg) + 1:
            return label[len(neg):]
    return None


def _strip_article(phrase: str) -> str:
    words = phrase.split()
    return " ".join(words[1:]) if len(words) > 1 and words[0].lower() in _ARTICLES else " ".join(words)


def _checked(labels: list[str]) -> list[str] | None:
    """``labels`` if they read as a label set, else None: 2 to `MAX_LABELS`, distinct ignoring
    case, each of 1 to `MAX_LABEL_WORDS` words without quotes, commas, brackets, example words or
    words of a clause (`_NOT_IN_LABELS`), all of one length in words, except a pair of which one
    negates the other."""
    labels = [_strip_article(label.strip().strip("\"'`“”‘’")) for label in labels]
    if not 2 <= len(labels) <= MAX_LABELS or len({label.casefold() for label in labels}) < len(labels):
        return None
    lengths = {len(label.split()) for label in labels}
    negation = len(labels) == 2 and any((_negated_core(b) or "").casefold() == a.casefold()
                                        for a, b in (labels, labels[::-1]))
    if len(lengths) > 1 and not negation:
        return None
    for label in labels:
        words = label.split()
        if not 1 <= len(words) <= MAX_LABEL_WORDS or any(c in label for c in "\"`,()[]{}") \
                or any(w.lower() in _NO_LABEL_WORDS for w in words):
            return None
    return labels
