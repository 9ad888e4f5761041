"""The quality table: oracle LoRAs, baselines and generated adapters on Super-NaturalInstructions.

    python -m benchmarks.quality generate ...   # answers of each row (GPU or CPU) -> <row>.jsonl
    python -m benchmarks.quality choose ...     # the sampler and system-prompt setting, on validation
    python -m benchmarks.quality score ...      # metrics from the answers (CPU) -> quality.json/.md/.png
    python -m benchmarks.quality.curves ...     # EM against training tasks and steps -> quality_curves.*

On the GPU machine: benchmarks/quality/gpu_pipeline.sh (see README.md here).
"""
