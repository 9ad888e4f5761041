"""Prompts and the output-token loss shared by every training through the base model.

The prompt of an instance is its input alone in the base model's chat template (optionally after
a system prompt and in-context shots); the target is the first accepted output plus the end-of-turn
token. `output_token_ce` computes cross-entropy on output tokens only, which is what the oracles,
the multi-task LoRA and T2L's SFT all minimise.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.sni import Instance, Task, split_instances


def chat_messages(
    input_text: str, system: str | None = None, shots: Sequence[Instance] = ()
) -> list[dict[str, str]]:
    """Chat messages for one instance: optional system prompt, optional shots as earlier turns, the input.

    With neither, the prompt is the instance input alone (the model's chat template then adds its
    default system prompt, as vLLM's chat endpoint does).
    """
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for shot in shots:
        messages.append({"role": "user", "content": shot.input})
        messages.append({"role": "assistant", "content": shot.outputs[0]})
    messages.append({"role": "user", "content": input_text})
    return messages


def truncate_text(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens (unchanged when shorter)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt ending with the assistant header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(
    tokenizer, input_text: str, output: str, max_input_tokens: int, max_output_tokens: int, system: str | None = None,
) -> tuple[list[int], list[int]]:
    """(prompt ids, output ids + eos) for one instance: the input in the chat template, after
    `system` as the system prompt if given."""
    p = prompt_ids(tokenizer, chat_messages(truncate_text(tokenizer, input_text, max_input_tokens), system=system))
    o = tokenizer(output, add_special_tokens=False)["input_ids"][: max_output_tokens - 1]
    return p, o + [tokenizer.eos_token_id]


def task_examples(
    tokenizer, task: Task, max_input_tokens: int, max_output_tokens: int
) -> list[tuple[list[int], list[int]]]:
    """A task's training examples (its train split; the first accepted output is the target)."""
    train, _ = split_instances(task)
    return [encode_example(tokenizer, x.input, x.outputs[0], max_input_tokens, max_output_tokens) for x in train]


def microbatches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped by similar length, each group's rows x longest row <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, cur, longest = [], [], 0
    for i in order:
        L = max(longest, lengths[i])
        if cur and L * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur, L = [], lengths[i]
        cur.append(i)
        longest = L
    if cur:
        groups.append(cur)
    return groups


def output_token_ce(model, seqs: Sequence[tuple[list[int], int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every output token of right-padded sequences, and the row of each token.

    seqs: (token ids, prompt length) per row; tokens after the prompt are the outputs. Logits are
    computed only where an output token is predicted (the vocabulary is large, outputs are short).
    Returns ce (n_out,), row (n_out,) on the model's device.
    """
    device = next(model.parameters()).device
    S = max(len(seq) for seq, _ in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    rows, pos, tgt = [], [], []
    for b, (seq, P) in enumerate(seqs):
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        rows += [b] * (len(seq) - P)
        pos += range(P - 1, len(seq) - 1)  # the hidden state at t predicts token t + 1
        tgt += seq[P:]
    rows_t, pos_t = torch.tensor(rows, device=device), torch.tensor(pos, device=device)
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows_t, pos_t]).float()  # (n_out, vocab)
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(tgt, device=device), reduction="none")
    return ce, rows_t
