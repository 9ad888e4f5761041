"""Ask a loragen-vllm server for one chat completion with an adapter made for a task description.

The `model` field carries the task description: the server generates (or reuses) a LoRA
adapter for it and answers with the base model plus that adapter.

    loragen-vllm serve --generator CKPT          # in another terminal
    python examples/chat_blocking.py
    python examples/chat_blocking.py --description "Translate English to French." "Good morning!"
"""

from __future__ import annotations

import argparse

from openai import OpenAI

DESCRIPTION = "Classify the sentiment of a movie review as positive or negative."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", default="A wonderful, moving film. I loved every minute.")
    p.add_argument("--description", default=DESCRIPTION, help="the task description (the `model` field)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")  # vLLM needs no key by default
    reply = client.chat.completions.create(
        model=args.description,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        temperature=0,
    )
    print(reply.choices[0].message.content)


if __name__ == "__main__":
    main()
