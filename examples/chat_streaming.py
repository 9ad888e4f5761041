"""Stream a chat completion from a loragen-vllm server, keyed by a task description.

Tokens are printed as they arrive. The first request for a new description also waits for
its adapter to be generated; later ones reuse the stored adapter.

    loragen-vllm serve --generator CKPT          # in another terminal
    python examples/chat_streaming.py
    python examples/chat_streaming.py --description "Summarise the text in one sentence." "$(cat notes.txt)"
"""

from __future__ import annotations

import argparse
import sys

from openai import OpenAI

DESCRIPTION = "Answer questions about world geography in one short sentence."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", default="What is the capital of France?")
    p.add_argument("--description", default=DESCRIPTION, help="the task description (the `model` field)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")
    stream = client.chat.completions.create(
        model=args.description,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
    print()


if __name__ == "__main__":
    main()
