"""``python -m loragen_vllm ...`` is the ``loragen-vllm`` command."""

from loragen_vllm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
