"""The quality table: oracle LoRAs, baselines and generated adapters on Super-NaturalInstructions.

    python -m benchmarks.quality generate ...   # answers of each row (GPU or CPU) -> <row>.jsonl
    python -m benchmarks.quality score ...      # metrics from the answers (CPU) -> quality.json/.md/.png
"""
