"""`loragen_vllm.labels`: which labels a description states, in the canonical sentence or in a
user's words. A wrong label set would force wrong answers, so the cases where it must state
nothing matter as much as those where it reads labels."""

from __future__ import annotations

import pytest

from loragen_vllm.labels import labels_in_words, stated_labels


@pytest.mark.parametrize(("description", "labels"), [
    ("Does the sentence fit the story? Answer Yes or No.", ["Yes", "No"]),
    ("Is the Head something you could use to do the Tail? Say yes or no.", ["yes", "no"]),
    ('Say "yes" or "no".', ["yes", "no"]),
    ("Classify the sentiment of this tweet as positive or negative.", ["positive", "negative"]),
    ("Label the passage as Stereotype or Anti-stereotype.", ["Stereotype", "Anti-stereotype"]),
    ("Label it hope speech or not.", ["hope speech", "not hope speech"]),
    ("Tell me the sentiment of this app review: Positive or Negative.", ["Positive", "Negative"]),
    ("Answer positive, negative, or neutral.", ["positive", "negative", "neutral"]),
    ("Is this tweet positive or negative?", ["positive", "negative"]),
    ("Is this online comment a threat or a non-threat?", ["threat", "non-threat"]),
    ("Is this comment Hope Speech or Not Hope Speech?", ["Hope Speech", "Not Hope Speech"]),
    ("Based on the explanation, is the statement True or False?", ["True", "False"]),
    ("Which option (A, B, C, D or E) best answers this question?", ["A", "B", "C", "D", "E"]),
    ("Pick the answer (1, 2, or 3) that fits.", ["1", "2", "3"]),
    ("Fill in the blank: answer A or B.", ["A", "B"]),
    ("Which option is right? Reply with A, B, C or D.", ["A", "B", "C", "D"]),
    ("Here's a claim; answer `yes` or `no`.", ["yes", "no"]),
    ("Classify each review as either favorable or unfavorable.", ["favorable", "unfavorable"]),
])
def test_labels_stated_in_words_are_read(description: str, labels: list[str]) -> None:
    assert labels_in_words(description) == labels
    assert stated_labels(description) == labels


@pytest.mark.parametrize("description", [
    "Summarise the article.",
    "Name a gene or protein mentioned in this sentence.",  # alternatives inside the sentence
    "Which body substance, like serum or saliva, is mentioned in this sentence?",  # examples
    "What's the coarse part-of-speech tag, like NOUN or VERB, of the word?",
    "Is the main verb in this sentence present or past tense?",  # where the first label starts is unclear
    "Tell me whether this sentence is in Present or Past tense.",
    "Say yes, or no if you can't tell.",  # a condition, not a label set
    "Use the story context, or say None.",
    "Answer briefly or in detail.",  # alternatives of different lengths
    "Rewrite the sentence as a question or a statement.",  # "as" without a verb asking for a label
    "Which is bigger, the first number or the second?",  # not a yes/no question
    "Is the review positive, negative or neutral?",  # "..., negative or neutral?" would drop a label
    "Here's a review and a label; is the label correct, True or False?",  # ... as this would not
    "Classify them as either supportive hope speech or as lacking positivity.",  # a clause, not a label
    "Reflect on hope speech, classifying it as either hope speech or its absence.",
    "Is this comment hope speech or not?",
    "Answer yes or yes.",  # not distinct
    "Answer with one of: yes, no.",
    "Decide. " + "Classify the input " * 30 + "as yes or no.",  # a last sentence over MAX_SENTENCE_CHARS
    # bracketed lists outside a sentence that asks to pick one, or with more to say after them
    "Pick the best option (A, B, or C). If none fits, answer None.",
    "Options are (1, 2 or 3); answer 0 if none applies.",
    "Given a list of options (a, b, c or d), return the text of the best option.",
    "Summarise the article in (1, 2 or 3) sentences.",
    "Write it in (US, UK or AU) English.",
    # kinds of answer, "either" without a verb of labelling, colons after no label word
    "Answer with a number or a word.",
    "Answer: a number or a word.",
    "Summarize the review. Answer: a short summary or an empty string.",
    "Write either a poem or a story.",
    "Either summarise or paraphrase.",
    "Extract the named entities of these types: person or organization.",
    "Translate the following sentence into French: Hello or goodbye.",
    "Decide if the tone matches the labeled sentiment as either positive or negative.",
    # clauses inside the alternatives
    "Classify the tweet as having positive or negative sentiment.",
    "Answer whether sarcastic or not.",
    "Classify the tweet as hate speech or offensive, please.",
])
def test_nothing_is_read_where_the_labels_are_unclear(description: str) -> None:
    assert labels_in_words(description) is None


def test_the_canonical_sentence_comes_first() -> None:
    named = 'Is this tweet positive or negative? Answer with one of: "NEG", "POS".'
    assert stated_labels(named) == ["NEG", "POS"]
    assert stated_labels("Is this tweet positive or negative?") == ["positive", "negative"]
    assert stated_labels("Summarise it.") is None
