#!/usr/bin/env bash
# The GPU block of the quality table's generator rows, in two calls on one warm machine:
#
#   bash benchmarks/quality/gpu_generators.sh train   # H100, 2026-11-23: 563 s, then RESUME=1 400 s
#     1. the oracle library again, with one shared A init for every task (generator.training.oracles's
#        default since the baseline run, which seeded each task's init by its name); 161-168 s;
#     2. in parallel on the one GPU (alone: LAE ~35 ms, DiT ~21 ms, T2L ~17 ms per step):
#        LoRAGen, the first run's spectral weight 2.0 and its three ablations (no MoE decoder,
#        no direction loss, no spectral loss), T2L (reconstruction) and T2L (SFT through the base
#        model; ~1.6 steps/s beside one LoRAGen run: 600 steps need a second call with RESUME=1).
#   bash benchmarks/quality/gpu_generators.sh eval    # 143 s (97 s of answers)
#     3. answers of every generator row and the conditioning controls, plus the oracle and
#        average-LoRA rows of the new library, several row groups in parallel;
#     4. the generation-latency benchmark on this GPU.
#
# Results go to $OUT (at most 8 files of 16 MiB: the default checkpoint comes back split).
# Scores are computed afterwards on any machine: python -m benchmarks.quality score ...
# Env: WORK (default /tmp/runs), CK (default /tmp/ck), DEADLINE_S (per phase), DRY=1 (tiny CPU dry run),
#      JOBS (what to train / answer; default: all of ALL_JOBS below; the oracle library is always
#      trained first, which skips the adapters already in $WORK/oracles).
set -euo pipefail
phase=${1:?usage: gpu_generators.sh train|eval}
OUT=${OUT:?set OUT}
WORK=${WORK:-/tmp/runs}
CK=${CK:-/tmp/ck}
mkdir -p "$OUT" "$WORK" "$CK"
source benchmarks/device_env.sh  # staged wheels, PYTHONPATH, LORAGEN_COMMIT
start=$SECONDS

if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu
  ORACLE=(--only task1146_country_capital task1147_country_currency task1508_wordnet_antonyms task1509_evalution_antonyms --steps 2 --batch-size 2)
  GEN=(--steps 3 --diffusion-steps 3 --batch-size 4)
  T2L=(--steps 3 --batch-size 4)
  SFT=(--steps 2 --tasks-per-step 2 --examples-per-task 2)
  EVAL=(--only task1146_country_capital task1509_evalution_antonyms --limit-instances 2)
  ALL=() HELD=()
else
  DEV=cuda
  ORACLE=()
  GEN=(--steps 3000 --diffusion-steps 4000 --batch-size 128 --tokens-per-step 256)
  T2L=(--steps 6000 --batch-size 128)
  SFT=(--steps 600)
  EVAL=(--task-set table)
  ALL=(--task-set all) HELD=(--task-set held_out)
fi

# LoRAGen variants: the first run's spectral-loss weight (2.0; the default is 0.2) and the ablations
# of LoRAGen's Table 4, which were run on that 2.0 configuration (the table's rows say so).
variant_config() {
  case "$1" in
    ws2) echo '{"lae": {"w_spectral": 2.0}}' ;;
    no_moe) echo '{"lae": {"num_experts": 1, "w_spectral": 2.0}}' ;;
    no_direction) echo '{"lae": {"w_direction": 0.0, "w_spectral": 2.0}}' ;;
    no_spectral) echo '{"lae": {"w_spectral": 0.0}}' ;;
    *) echo "unknown LoRAGen variant $1" >&2; return 2 ;;
  esac
}
# oracle, average: eval rows only (the library itself is trained in every train phase).
ALL_JOBS="oracle average loragen loragen_ws2 loragen_no_moe loragen_no_direction loragen_no_spectral t2l t2l_sft"
JOBS=${JOBS:-$ALL_JOBS}

case "$phase" in
train)
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"
  $PY -m generator.training.oracles train --tasks data/sni/tasks --out "$WORK/oracles" --device $DEV "${ORACLE[@]}" \
    2>&1 | tee "$WORK/oracles.log" | grep --line-buffered -v '%|' || true
  test -f "$WORK/oracles/oracles.json"
  cp "$WORK/oracles/oracles.json" "$OUT/"
  echo "oracles done at $((SECONDS - start)) s"
  lib="$WORK/oracles/library"
  pids=()
  # Each run stops before the call's 10-minute limit; a stopped run resumes with --resume.
  left=$((${DEADLINE_S:-560} - (SECONDS - start)))
  run() { local name=$1; shift; ( timeout "$left" "$@" > "$WORK/train_$name.log" 2>&1; echo "$name rc=$? at $((SECONDS - start)) s" ) & pids+=($!); }
  common=(--library "$lib" --device $DEV --no-progress --threads 2)
  common+=(${RESUME:+--resume})
  mkdir -p "$WORK/cfg"
  for job in $JOBS; do
    case "$job" in
      loragen) run loragen $PY -m generator train --kind loragen --out "$CK/loragen" "${common[@]}" "${GEN[@]}" ;;
      loragen_*)
        variant_config "${job#loragen_}" > "$WORK/cfg/$job.json"
        run "$job" $PY -m generator train --kind loragen --out "$CK/$job" "${common[@]}" "${GEN[@]}" \
          --model-config "$WORK/cfg/$job.json" ;;
      t2l) run t2l $PY -m generator train --kind t2l --out "$CK/t2l" "${common[@]}" "${T2L[@]}" ;;
      # SFT stops itself 30 s before the others' deadline and keeps what it learned (extra.stopped_at).
      t2l_sft) run t2l_sft $PY -m generator.sft --tasks data/sni/tasks --library "$lib" --out "$CK/t2l_sft" \
        --device $DEV "${SFT[@]}" --max-seconds $((left > 60 ? left - 30 : 30)) ${RESUME:+--resume} ;;
      oracle|average) ;;
      *) echo "unknown job $job" >&2; exit 2 ;;
    esac
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  for f in "$WORK"/train_*.log; do echo "== $f"; tail -n 3 "$f"; done
  mkdir -p "$WORK/configs"
  for d in "$CK"/*/; do [ -f "$d/config.json" ] && cp "$d/config.json" "$WORK/configs/$(basename "$d").json"; done
  (cd "$WORK" && tar czf "$OUT/train_logs.tgz" oracles.log train_*.log configs)
  # The default checkpoint's candidate: config + weights, split below the 16 MiB per-file limit.
  if [ -f "$CK/loragen/model.safetensors" ]; then
    cp "$CK/loragen/config.json" "$OUT/loragen_config.json"
    split -b 15M -d "$CK/loragen/model.safetensors" "$OUT/loragen_model.safetensors.part"
  fi
  echo "train phase done at $((SECONDS - start)) s"
  ;;
eval)
  q="$WORK/quality"
  pids=()
  left=$((${DEADLINE_S:-470} - (SECONDS - start)))
  gen() { local name=$1; shift; ( timeout "$left" $PY -m benchmarks.quality generate --tasks data/sni/tasks --out "$q" --device $DEV \
      --seeds 0 "${EVAL[@]}" "$@" > "$WORK/eval_$name.log" 2>&1; echo "$name rc=$? at $((SECONDS - start)) s" ) & pids+=($!); }
  # Oracles on every task (the "beats the base model" check), the average LoRA on the table's tasks,
  # conditioning controls on the held-out tasks only (the claim they test is zero-shot).
  for job in $JOBS; do
    case "$job" in
      oracle) gen oracle --oracles "$WORK/oracles" --rows oracle "${ALL[@]}" ;;
      average) gen average --oracles "$WORK/oracles" --rows average ;;
      *) gen "$job" --generator "$CK/$job" --rows "$job" ;;
    esac
    # The conditioning controls, for the generators the issue names (and the first LoRAGen run).
    case "$job" in loragen|t2l_sft|loragen_ws2)
      gen "${job}_controls" --generator "$CK/$job" --rows "${job}_random" "${job}_other" "${HELD[@]}" ;;
    esac
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  for f in "$WORK"/eval_*.log; do echo "== $f"; tail -n 2 "$f"; done
  tar czf "$OUT/generations_generators.tgz" -C "$WORK" quality $(cd "$WORK" && ls eval_*.log)
  echo "generations done at $((SECONDS - start)) s"
  lat=$((570 - (SECONDS - start)))  # what is left of the call, at most 150 s
  if [ "$DEV" = cuda ] && [ "$lat" -gt 30 ]; then
    timeout $((lat > 150 ? 150 : lat)) $PY benchmarks/generation_latency.py --device cuda --checkpoint "$CK/loragen" \
      --library "$WORK/oracles/library" --out "$OUT/generation_latency_cuda.json" 2>&1 | grep -v '%|' | tail -n 25 \
      || echo "latency benchmark failed"
  fi
  echo "eval phase done at $((SECONDS - start)) s"
  ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
