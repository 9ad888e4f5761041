"""The same inputs answered by the base model and by the adapter generated for a description.

The default description and inputs come from a task held out from generator training
(Super-NaturalInstructions task1453, person names; data/sni/splits.json): the shipped
generator never saw this task, this description or these inputs.

    loragen-vllm serve                 # in another terminal (the shipped default generator)
    python examples/side_by_side.py
    python examples/side_by_side.py --description "Translate English to French." "Good morning!"
"""

from __future__ import annotations

import argparse

from openai import OpenAI

DESCRIPTION = (
    "The task is about extracting personal names found in various sentences. Recognize that some "
    "phrases might sound like names but are not, so trust your understanding of common naming conventions."
)
INPUTS = [
    "Photo credit : Austin Swift - - Las Vegas , NV . http://t.co/4CRYkU60vw",
    "Defence industry roadshow with Stuart Robert continues in Adelaide , Sydney today - SMEs struggling "
    "with erratic ALP decisions",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", default=INPUTS)
    p.add_argument("--description", default=DESCRIPTION, help="the task description (the `model` field)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--max-tokens", type=int, default=30)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")  # vLLM needs no key by default
    base = client.models.list().data[0].id  # the served base model is listed first

    def answer(model: str, text: str) -> str:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=args.max_tokens, temperature=0)
        return " ".join((reply.choices[0].message.content or "").split())

    print(f"description: {args.description}\n")
    for text in args.inputs:
        print(f"input:             {text}")
        print(f"base model:        {answer(base, text)}")
        print(f"generated adapter: {answer(args.description, text)}\n")


if __name__ == "__main__":
    main()
