"""Serving latency benchmark: generated LoRA adapters against oracle (trained) adapters.

Drives one vLLM OpenAI server (started through `loragen-vllm serve`, or already running)
with concurrent streaming clients and measures time to first token, end-to-end latency and
output tokens/s per scenario; see `scenarios.py` for the scenarios and `report.py` for the
targets. Entry point: `python -m benchmarks.serving --help`.
"""
