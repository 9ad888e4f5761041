#!/usr/bin/env bash
# The quality table on the GPU machine, in three calls on one warm machine (each under 10 minutes;
# each phase resumes what an interrupted call left in $WORK):
#
#   bash benchmarks/quality/gpu_pipeline.sh oracles   # oracle LoRA of every task + the multi-task LoRA
#   bash benchmarks/quality/gpu_pipeline.sh train     # generators, side by side on the one GPU
#   bash benchmarks/quality/gpu_pipeline.sh eval      # validation (choices), then test (reported once)
#   bash benchmarks/quality/gpu_pipeline.sh sft       # LoRAGen SFT variants from the shipped checkpoint
#   bash benchmarks/quality/gpu_pipeline.sh eval_sft  # incumbent vs SFT on validation; the winner on test
#   bash benchmarks/quality/gpu_pipeline.sh sft_eval  # a short sft (SFT_ONLY variants) and eval_sft in one call
#   bash benchmarks/quality/gpu_pipeline.sh sft_curve # SFT from the reconstruction checkpoint, snapshots, eval_sft
#   bash benchmarks/quality/gpu_pipeline.sh sampler   # the shipped checkpoint's sampler chosen again on validation
#   bash benchmarks/quality/gpu_pipeline.sh anchors   # conditioning blended with the nearest training descriptions
#   bash benchmarks/quality/gpu_pipeline.sh variants  # other served-time variants ($VARIANTS, e.g. scale_0.75)
#   bash benchmarks/quality/gpu_pipeline.sh latency   # CUDA-graph tests + generation latency of $INIT
#   bash benchmarks/quality/gpu_pipeline.sh soup      # weight averages of checkpoints ($SOUPS) vs the incumbent
#   bash benchmarks/quality/gpu_pipeline.sh named_labels       # SFT with descriptions naming labels, and its control
#   bash benchmarks/quality/gpu_pipeline.sh named_labels_eval  # both on validation, plain and naming labels; the rule
#   bash benchmarks/quality/gpu_pipeline.sh user_style_eval    # SFT with user-style descriptions (arm user of
#                                                              # named_labels) on validation, as given and user-style
#   bash benchmarks/quality/gpu_pipeline.sh t2l_sft         # T2L by SFT on all 342 training tasks, side by side
#                                                           # (rerun until done)
#   bash benchmarks/quality/gpu_pipeline.sh t2l_sft_eval    # its snapshots and runs on validation; the rule
#   bash benchmarks/quality/gpu_pipeline.sh winner_test_rows   # test rows, once, of a winner chosen elsewhere ($WINNER)
#   bash benchmarks/quality/gpu_pipeline.sh fit       # SFT on the in-distribution tasks alone vs on all (fit)
#   bash benchmarks/quality/gpu_pipeline.sh fit_eval  # their in-distribution and validation rows; the rule
#   bash benchmarks/quality/gpu_pipeline.sh all_tasks       # oracles + reconstruction on all 342 training tasks,
#                                                           # then SFT from it (rerun until done)
#   bash benchmarks/quality/gpu_pipeline.sh all_tasks_eval  # those SFT runs (seed 0, both averaged) on validation; the rule
#   (ALL_RUN names a variant of both, ALL_GEN its reconstruction options after $GEN: e.g. ALL_RUN=all_scaled
#   ALL_GEN="--steps 5029 --diffusion-steps 6706", the 204-task run's steps scaled to 342 tasks)
#
# train: LoRAGen on all training tasks (with snapshots along its denoiser steps: quality against
#   steps), LoRAGen on the first 50 / 100 training tasks (quality against tasks), T2L
#   (reconstruction) and T2L (SFT through the base model, stopped by the deadline).
# eval, wave 1: baselines on validation + test + in-distribution tasks; on validation the LoRAGen
#   sampler variants (guidance x steps) and the description as system prompt with the adapter; the
#   curves (snapshots, task subsets; one description per task) on validation and test.
# eval, wave 2: the sampler setting with the best validation EM (ties: the checkpoint's default) is
#   written into the LoRAGen checkpoint's config; then every generated row on test (+ in-distribution):
#   LoRAGen, its user-style descriptions, with the description as system prompt, its two conditioning
#   controls, T2L (recon) and T2L (SFT).
# sft / eval_sft: SFT_ONLY (the variants to train), SFT_STEPS, SFT_LR, SFT_DEADLINE_S (sft_eval's
#   share for sft), SFT_CONTROLS (rows, e.g. "incumbent loragen_sft_contrast", whose conditioning
#   controls eval_sft also generates on validation), MAX_ROWS (row processes at a time, default 5).
# sft_curve: CURVE_LRS, SFT_STEPS, CURVE_SNAPSHOTS, SFT_DEADLINE_S, CURVE_EVAL=0 (train only).
# Results go to $OUT (at most 8 files, 16 MiB each). Scores: python -m benchmarks.quality score ...
# Env: WORK (/tmp/runs), CK (/tmp/ck), DEADLINE_S (per call, default 560), DRY=1 (tiny CPU run).
set -euo pipefail
phase=${1:?usage: gpu_pipeline.sh PHASE (the list at the top of this file)}
OUT=${OUT:?set OUT}
WORK=${WORK:-/tmp/runs}
CK=${CK:-/tmp/ck}
DEADLINE_S=${DEADLINE_S:-560}
mkdir -p "$OUT" "$WORK" "$CK"
source benchmarks/device_env.sh  # staged wheels, PYTHONPATH, LORAGEN_COMMIT
# The task files travel apart from the tree (the caller unpacks them on every call): none, no run.
compgen -G "data/sni/tasks/*.json" > /dev/null || { echo "no task files in data/sni/tasks: unpack them first" >&2; exit 2; }
start=$SECONDS
left() { echo $((DEADLINE_S - (SECONDS - start))); }

if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu
  # 8 training tasks (the first of the task-count curve's order), 2 validation and 2 test tasks.
  mapfile -t DRY_TASKS < <($PY -c "
import hashlib
from generator.data.sni import load_splits
s = load_splits('data/sni/tasks')
order = sorted(s.train, key=lambda n: hashlib.sha256(f'sni-scale\x00{n}'.encode()).hexdigest())
print('\n'.join(order[:8] + list(s.validation[:2]) + list(s.test[:2])))")
  ORACLE=(--steps 2 --batch-size 2 --multitask-batch-size 4)
  ORACLE_TASKS=(--only "${DRY_TASKS[@]}")
  GEN=(--steps 4 --diffusion-steps 6 --batch-size 4)
  SNAP=(--snapshots 3 6)
  T2L=(--steps 3 --batch-size 4)
  SFT=(--steps 2 --tasks-per-step 2 --examples-per-task 2)
  SUBSETS="4 8"
  EVAL=(--limit-instances 2 --only "${DRY_TASKS[@]}")
  GUIDANCES="1.0 2.0" STEPS="5"
  SFT_L=(--steps 2 --tasks-per-step 2 --examples-per-task 2 --sampler-steps 3 --tasks-file "$WORK/subsets/dry.txt"
    --probe-tasks-file "$WORK/subsets/dry_probe.txt")
  mkdir -p "$WORK/subsets" && printf '%s\n' "${DRY_TASKS[@]:0:4}" > "$WORK/subsets/dry.txt"
  printf '%s\n' "${DRY_TASKS[@]:8:1}" > "$WORK/subsets/dry_probe.txt"  # one validation task
  CURVE=(--steps 2 --tasks-per-step 2 --examples-per-task 2 --tasks-file "$WORK/subsets/dry.txt"
    --probe-tasks-file "$WORK/subsets/dry_probe.txt" --snapshots 1 --probe-every 1)
else
  DEV=cuda
  # ORACLE_TPM: tokens a micro-batch (98304 ran on an H200; the H100 run of all_tasks used 49152)
  ORACLE=(--group-size 160 --tokens-per-microbatch "${ORACLE_TPM:-98304}")
  ORACLE_TASKS=()
  GEN=(--steps 3000 --diffusion-steps 4000 --batch-size 128 --tokens-per-step 256)
  SNAP=(--snapshots 500 1000 2000 4000)
  T2L=(--steps 6000 --batch-size 128)
  SFT=(--steps 600)
  SUBSETS="50 100"
  EVAL=()
  GUIDANCES="1.0 2.0" STEPS="5 20"
  SFT_L=(--steps ${SFT_STEPS:-500} --lr ${SFT_LR:-1e-4})
  CURVE=(--steps "${SFT_STEPS:-200}" --snapshots ${CURVE_SNAPSHOTS:-50 100 150} --probe-every 50)
fi
INIT=${INIT:-generator/checkpoints/default}  # the incumbent: where LoRAGen SFT starts
lib="$WORK/oracles/library"
pids=()
# Training job `name` in the background, logged to $WORK/train_<name>.log; a finished checkpoint
# (config.json, no training state left) is not trained again.
run() { local name=$1; shift; [ -f "$CK/$name/config.json" ] && [ ! -f "$CK/$name/train_state.pt" ] && return 0
  ( timeout "$(left)" "$@" > "$WORK/train_$name.log" 2>&1; echo "$name rc=$? at $((SECONDS - start)) s" ) & pids+=($!); }
# Generation rows `$@` in the background into folder `out`, logged to $WORK/eval_<name>.log.
gen() { local name=$1 out=$2; shift 2; ( timeout "$(left)" $PY -m benchmarks.quality generate --tasks data/sni/tasks \
    --out "$out" --device $DEV --seeds 0 "${EVAL[@]}" "$@" > "$WORK/eval_$name.log" 2>&1
    echo "$name rc=$? at $((SECONDS - start)) s" ) & pids+=($!); }
waitall() { for p in "${pids[@]}"; do wait "$p" || true; done; pids=(); }
# The row name of a checkpoint folder: its name, or <run>_at<step> for a snapshot <run>/snapshots/sft-<step>/.
row_of() { local name; name=$(basename "$1")
  [[ $name == sft-* ]] && name="$(basename "$(dirname "$(dirname "$1")")")_at${name#sft-}"; echo "$name"; }
# A chosen generator's rows, once, as served (description also as system prompt), into `out`: row
# `row` on test + in-distribution, its conditioning controls and the user-style descriptions on test
# (more `generate` options after the checkpoint).
test_rows() { local row=$1 out=$2 ck=$3; shift 3
  gen "$row" "$out" --generator "$ck" --task-set table --rows "$row" --system-prompt "$@"
  gen "${row}_controls" "$out" --generator "$ck" --task-set test --rows "${row}_random" "${row}_other" --system-prompt "$@"
  gen "${row}_user" "$out" --generator "$ck" --task-set test --rows "${row}_user" --user-descriptions --system-prompt "$@"; }
# Checkpoint `ck` as a candidate: row `name` on validation as served (2 descriptions per task) into
# folder `qv`, logged as eval_<log> (default val_<name>), added to the array `cands`; then waits
# for the running rows once MAX_ROWS (5) run (ten at once ran out of memory on an H100).
candidate() { local name=$1 ck=$2 qv=$3 log=${4:-val_$1}
  gen "$log" "$qv" --generator "$ck" --task-set validation --rows "$name" --system-prompt --num-descriptions 2
  cands+=(--candidate "$name=$ck")
  if [ ${#pids[@]} -ge "${MAX_ROWS:-5}" ]; then waitall; fi; }
# Checkpoint `ck`'s validation rows as served, as row `name`: with 2 evaluation descriptions per task
# into folder `qv` (log eval_<log>_<name>) and, given a folder `qu`, with the validation tasks'
# user-style descriptions into it (eval_<log>_<name>_user); then waits for the running rows once
# MAX_ROWS (6) run.
served_rows() { local log=$1 name=$2 ck=$3 qv=$4 qu=${5:-}
  gen "${log}_$name" "$qv" --generator "$ck" --task-set validation --rows "$name" --system-prompt --num-descriptions 2
  [ -z "$qu" ] || gen "${log}_${name}_user" "$qu" --generator "$ck" --task-set validation --rows "$name" --system-prompt \
    --user-descriptions
  if [ ${#pids[@]} -ge "${MAX_ROWS:-6}" ]; then waitall; fi; }
# A new default's weights back to the caller: $OUT/<tag>_config.json and 15 MB parts of the weights.
send_back() { local ck=$1 tag=$2
  cp "$ck/config.json" "$OUT/${tag}_config.json"
  split -b 15M -d "$ck/model.safetensors" "$OUT/${tag}_model.safetensors.part"; }
# Once the candidates' rows are written: the best of `cands` on validation folder `qv` into $win
# (`choose_best <tag>`); if it is not the incumbent, its rows on test as row `row` into folder `qt`,
# once, and its weights back in $OUT.
settle() { local tag=$1 row=$2 qt=$3
  waitall
  echo "validation done at $((SECONDS - start)) s"
  win=$(choose_best "$tag" checkpoint "$qv" "${cands[@]}")
  [ "$win" != "$INIT" ] || return 0
  test_rows "$row" "$qt" "$win"
  waitall
  send_back "$win" "$row"; }
# The best of the candidates (`--candidate ROW=CHECKPOINT` ...) on validation folder `qv` (ties: the
# first, the incumbent), recorded in $WORK/choice_<tag>.json and $OUT/choice_<tag>.txt; prints the
# choice's field `key` ("chosen": the row, "checkpoint": its checkpoint).
choose_best() { local tag=$1 key=$2 qv=$3; shift 3
  $PY -m benchmarks.quality choose-checkpoint --tasks data/sni/tasks --validation "$qv" "$@" \
    --out "$WORK/choice_$tag.json" > "$OUT/choice_$tag.txt"
  cat "$OUT/choice_$tag.txt" >&2
  $PY -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$WORK/choice_$tag.json" "$key"; }
# Weight averages named in a spec "name:CK CK ...;name:CK CK ..." (each CK relative to $CK,
# absolute, or INIT for $INIT): every entry checked (before any GPU work) into the arrays
# soup_names (soup_<name>) and soup_sources; `make_soup i` then makes soup i into $CK/soup_<name>
# again (seconds): a name reused with other sources gets a new fingerprint, and `choose-checkpoint`
# refuses a validation row left from the old one.
soup_specs() { local spec name srcs c specs; IFS=';' read -ra specs <<< "$1"
  soup_names=() soup_sources=()
  for spec in "${specs[@]}"; do
    name=${spec%%:*} srcs=""
    [[ $spec == *:* && $name =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "bad soup entry '$spec' (name:CK CK ...)" >&2; exit 2; }
    for c in ${spec#*:}; do [ "$c" = INIT ] && c=$INIT; [[ $c == /* || $c == "$INIT" ]] || c="$CK/$c"
      [ -f "$c/config.json" ] || { echo "soup $name: no checkpoint at $c" >&2; exit 2; }; srcs+="$c "; done
    [ $(wc -w <<< "$srcs") -ge 2 ] || { echo "soup $name: a soup needs at least two checkpoints" >&2; exit 2; }
    soup_names+=("soup_$name") soup_sources+=("$srcs")
  done; }
make_soup() { rm -rf "$CK/${soup_names[$1]}" && $PY -m generator.soup --out "$CK/${soup_names[$1]}" ${soup_sources[$1]}; }
# Appends "soup_<name>=$CK/soup_<name>" to the array named $1 for each weight average of spec $2
# (soup_specs; empty: none), each made now.
add_soups() { local -n into=$1; local i; [ -n "$2" ] || return 0; soup_specs "$2"
  for i in "${!soup_names[@]}"; do make_soup "$i"; into+=("${soup_names[$i]}=$CK/${soup_names[$i]}"); done; }
# Appends "<row>=<folder>" to the array named $1 for each finished SFT checkpoint folder after it
# (row_of without its loragen_sft_; a run its deadline stopped, its training state left, is none).
add_finished() { local -n into=$1; shift; local d name
  for d in "$@"; do [ -f "$d/config.json" ] && [ ! -f "$d/train_state.pt" ] || continue
    name=$(row_of "$d"); into+=("${name#loragen_sft_}=${d%/}"); done; }
# A checkpoint staged by the caller as $CK/<name>: weights /tmp/stage/files/<name>_model.safetensors
# (device-stage) and config .devtools/<name>/config.json (carried); made once, checked by loading.
staged_checkpoint() { local name=$1
  if [ ! -f "$CK/$name/config.json" ] && [ -f "/tmp/stage/files/${name}_model.safetensors" ]; then
    mkdir -p "$CK/$name" && cp "/tmp/stage/files/${name}_model.safetensors" "$CK/$name/model.safetensors"
    cp ".devtools/$name/config.json" "$CK/$name/config.json"
  fi
  $PY -c "from generator import Generator; g = Generator.load('$CK/$name'); print('$name', g.fingerprint[:12], g.extra.get('training'))"; }

# all_tasks / all_tasks_eval: the run's name; the training tasks (the dry run's 8) into the array
# train_tasks and the run's curve row (loragen_n<tasks>[_<name without all_>]) into curve_row.
ALL_RUN=${ALL_RUN:-all}
[[ $ALL_RUN =~ ^all(_[a-z0-9]+)?$ ]] || { echo "ALL_RUN must be all or all_<name> (a-z, 0-9)" >&2; exit 2; }
all_tasks_of_run() { mkdir -p "$WORK/subsets"
  $PY -c "from generator.data.sni import load_splits; print('\n'.join(load_splits('data/sni/tasks').train))" \
    > "$WORK/subsets/train.txt"
  train_tasks=($(cat "$WORK/subsets/train.txt")) && [ "${DRY:-0}" = 1 ] && train_tasks=("${DRY_TASKS[@]:0:8}")
  curve_row=loragen_n${#train_tasks[@]} && [ "$ALL_RUN" = all ] || curve_row+=_${ALL_RUN#all_}
  id_only=()  # the dry run's tasks hold no in-distribution one: its first
  [ "${DRY:-0}" = 1 ] && id_only=(--only "$($PY -c "from generator.data.sni import load_splits
print(load_splits('data/sni/tasks').in_distribution_eval[0])")") || true; }
# all_tasks' logs, configs, curve and diagnostic rows into $OUT/<ALL_RUN>_tasks_logs.tgz.
all_tasks_archive() { local recon=loragen_$ALL_RUN sft=loragen_sft_$ALL_RUN
  mkdir -p "$WORK/configs" && cp "$CK/$recon/config.json" "$WORK/configs/$recon.json"
  (cd "$WORK" && tar czf "$OUT/${ALL_RUN}_tasks_logs.tgz" oracles.log $(ls train_$recon.log train_${sft}.log \
    train_${sft}_s1.log eval_curve_${ALL_RUN}_*.log eval_${ALL_RUN}_diag_*.log q_validation/$curve_row.jsonl \
    q_test/$curve_row.jsonl 2>/dev/null) $( [ -d q_diag_$ALL_RUN ] && echo q_diag_$ALL_RUN ) configs subsets/train.txt); }
# ALL_ID=1: the run's reconstruction as a reconstruction checkpoint is served (guidance 2, 20 steps, the
# description also as system prompt) on validation (2 descriptions per task) and the in-distribution
# tasks, as its curve row, into $WORK/q_diag_$ALL_RUN/<set>/.
recon_diag_rows() { local qd="$WORK/q_diag_$ALL_RUN" served=(--system-prompt --guidance 2 --sampler-steps 20)
  gen "${ALL_RUN}_diag_val_recon" "$qd/validation" --generator "$CK/loragen_$ALL_RUN" --task-set validation \
    --rows "$curve_row" --num-descriptions 2 "${served[@]}"
  gen "${ALL_RUN}_diag_id_recon" "$qd/in_distribution" --generator "$CK/loragen_$ALL_RUN" --task-set in_distribution \
    --rows "$curve_row" "${served[@]}" "${id_only[@]}"; }

case "$phase" in
oracles)
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"
  $PY -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  timeout "$(left)" $PY -m generator.training.oracles train --tasks data/sni/tasks --out "$WORK/oracles" --multitask \
    --device $DEV "${ORACLE[@]}" "${ORACLE_TASKS[@]}" 2>&1 | tee -a "$WORK/oracles.log" | grep --line-buffered -v '%|' || true
  cp "$WORK/oracles/oracles.json" "$OUT/" 2>/dev/null || true
  echo "oracles: $(ls "$lib" 2>/dev/null | wc -l) training + $(ls "$WORK/oracles/held_out" 2>/dev/null | wc -l) held-out adapters, $((SECONDS - start)) s"
  ;;
train)
  test -d "$lib"
  mkdir -p "$WORK/subsets"
  # The first N training tasks in a fixed (sha256) order: quality against the number of tasks.
  $PY - "$WORK/subsets" $SUBSETS <<'PY'
import hashlib, sys
from pathlib import Path
from generator.data.sni import load_splits
splits = load_splits("data/sni/tasks")
order = sorted(splits.train, key=lambda n: hashlib.sha256(f"sni-scale\x00{n}".encode()).hexdigest())
for n in sys.argv[2:]:
    Path(sys.argv[1], f"n{n}.txt").write_text("\n".join(order[: int(n)]) + "\n")
PY
  common=(--library "$lib" --device $DEV --no-progress --threads 2 --resume)
  run loragen $PY -m generator train --kind loragen --out "$CK/loragen" "${common[@]}" "${GEN[@]}" "${SNAP[@]}"
  for n in $SUBSETS; do
    run "loragen_n$n" $PY -m generator train --kind loragen --out "$CK/loragen_n$n" "${common[@]}" "${GEN[@]}" \
      --tasks-file "$WORK/subsets/n$n.txt"
  done
  run t2l $PY -m generator train --kind t2l --out "$CK/t2l" "${common[@]}" "${T2L[@]}"
  run t2l_sft $PY -m generator.training.sft --tasks data/sni/tasks --library "$lib" --out "$CK/t2l_sft" --device $DEV \
    "${SFT[@]}" --max-seconds $(( $(left) > 60 ? $(left) - 40 : 20 )) --resume
  waitall
  for f in "$WORK"/train_*.log; do echo "== $f"; tail -n 2 "$f"; done
  mkdir -p "$WORK/configs"
  for d in "$CK"/*/; do [ -f "$d/config.json" ] && cp "$d/config.json" "$WORK/configs/$(basename "$d").json"; done
  (cd "$WORK" && tar czf "$OUT/train_logs.tgz" train_*.log configs subsets)
  echo "train phase done at $((SECONDS - start)) s"
  ;;
eval)
  qv="$WORK/q_validation" qt="$WORK/q_test"
  # Wave 1. Baselines (no choices involved) on every evaluated task; one process per row group.
  gen base "$qt" --oracles "$WORK/oracles" --rows base system --task-set evaluated
  gen icl "$qt" --oracles "$WORK/oracles" --rows icl average --task-set evaluated
  gen oracle "$qt" --oracles "$WORK/oracles" --rows oracle multitask --task-set evaluated
  # Choices, on validation only: sampler (guidance x steps) and the description as system prompt.
  for g in $GUIDANCES; do
    for s in $STEPS; do
      gen "val_g${g}_s$s" "$qv" --generator "$CK/loragen" --task-set validation --rows "loragen_g${g}_s$s" \
        --guidance "$g" --sampler-steps "$s"
    done
  done
  gen val_sys "$qv" --generator "$CK/loragen" --task-set validation --rows loragen_sys --system-prompt
  # The curves: snapshots along the denoiser steps, and the task-count subsets, on validation and test.
  for d in "$CK"/loragen/snapshots/dit-*; do
    [ -d "$d" ] || continue
    for set in validation test; do
      gen "curve_$(basename "$d")_$set" "$WORK/q_$set" --generator "$d" --task-set $set --rows "loragen_$(basename "$d")" \
        --num-descriptions 1
    done
  done
  for n in $SUBSETS; do
    for set in validation test; do
      [ -f "$CK/loragen_n$n/config.json" ] && gen "curve_n${n}_$set" "$WORK/q_$set" --generator "$CK/loragen_n$n" \
        --task-set $set --rows "loragen_n$n" --num-descriptions 1
    done
  done
  waitall
  echo "wave 1 done at $((SECONDS - start)) s"
  # The choice: the sampler setting (and system prompt or not) with the best validation EM.
  $PY -m benchmarks.quality choose --tasks data/sni/tasks --validation "$qv" --checkpoint "$CK/loragen" \
    --out "$WORK/choice.json" | tee "$OUT/choice.txt"
  sys_flag=$($PY -c "import json; print('--system-prompt' if json.load(open('$WORK/choice.json'))['system_prompt'] else '')")
  # Wave 2: every generated row on test (+ in-distribution), once, with the chosen settings.
  gen loragen "$qt" --generator "$CK/loragen" --task-set table --rows loragen $sys_flag
  gen loragen_controls "$qt" --generator "$CK/loragen" --task-set test --rows loragen_random loragen_other $sys_flag
  gen loragen_user "$qt" --generator "$CK/loragen" --task-set test --rows loragen_user --user-descriptions $sys_flag
  if [ -z "$sys_flag" ]; then
    gen loragen_sys "$qt" --generator "$CK/loragen" --task-set test --rows loragen_sys --system-prompt
  fi
  gen t2l "$qt" --generator "$CK/t2l" --task-set table --rows t2l
  [ -f "$CK/t2l_sft/config.json" ] && gen t2l_sft "$qt" --generator "$CK/t2l_sft" --task-set table --rows t2l_sft
  waitall
  for f in "$WORK"/eval_*.log; do echo "== $f"; tail -n 2 "$f"; done
  tar czf "$OUT/generations.tgz" -C "$WORK" q_validation q_test choice.json $(cd "$WORK" && ls eval_*.log)
  # The candidate default checkpoint (with the chosen sampler in its config), split under 16 MiB a file.
  send_back "$CK/loragen" loragen
  # CUDA graphs: the same adapters as eager (the test), and the latency of the trained checkpoint.
  if [ "$DEV" = cuda ] && [ "$(left)" -gt 60 ]; then
    timeout $(( $(left) - 10 )) $PY -m pytest -q --noconftest tests/test_graphs.py > "$OUT/test_graphs.log" 2>&1 || true
    tail -n 3 "$OUT/test_graphs.log"
    timeout $(( $(left) > 15 ? $(left) - 10 : 5 )) $PY benchmarks/generation_latency.py --device cuda \
      --checkpoint "$CK/loragen" --library "$lib" --steps 20,5 --batch 32 --out "$OUT/generation_latency_cuda.json" \
      2>&1 | grep -v '%|' | tail -n 20 || echo "latency benchmark: not finished"
  fi
  echo "eval phase done at $((SECONDS - start)) s"
  ;;
sft)
  # LoRAGen SFT through the base model, from $INIT (default: the shipped checkpoint), side by side.
  # Without --sampler-steps / --guidance a variant trains through the sampler $INIT is served with
  # (e8f7b1c045c0: 5 steps, guidance 1.0). Variants: that sampler with the description as system
  # prompt (loragen_sft; loragen_sft_lowlr at lr 3e-5), a higher learning rate, 5 sampler steps
  # (also at 3e-5), no system prompt in training, only the 204 tasks the shipped checkpoint's
  # oracles covered (quality against tasks), and 5 sampler steps with the contrastive term (right
  # description's CE below another task's by 0.5 nats per output token; it logs sft_ce_right /
  # sft_ce_wrong / sft_ce_gap every 20 steps) or with noise on the description embeddings (cosine
  # ~0.8 to the clean one). Every variant probes the validation tasks every 25 steps (CE under the
  # right description's adapter vs a random string's, in <checkpoint>/probe.jsonl, copied into
  # sft_logs.tgz). No oracles needed.
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"  # once, before 5 readers
  mkdir -p "$WORK/subsets"
  $PY -c "import json; print('\n'.join(json.load(open('$INIT/config.json'))['extra']['library']['tasks']))" \
    > "$WORK/subsets/init_tasks.txt"
  sft() { local name=$1; shift; [ -n "${SFT_ONLY:-}" ] && [[ " $SFT_ONLY " != *" $name "* ]] && return 0; run "$name" $PY -m generator.training.sft --kind loragen --init "$INIT" \
    --tasks data/sni/tasks --out "$CK/$name" --device $DEV --no-progress --threads 2 --resume \
    --max-seconds $(( $(left) > 60 ? $(left) - 45 : 15 )) --probe-every 25 "${SFT_L[@]}" "$@"; }
  sft loragen_sft --system-prompt
  sft loragen_sft_lr3 --system-prompt --lr 3e-4
  sft loragen_sft_s5 --system-prompt --sampler-steps 5
  sft loragen_sft_s5_lowlr --system-prompt --sampler-steps 5 --lr 3e-5
  sft loragen_sft_nosys
  sft loragen_sft_n204 --system-prompt --tasks-file "$WORK/subsets/init_tasks.txt"
  sft loragen_sft_contrast --system-prompt --sampler-steps 5 --contrast-weight 1.0 --contrast-margin 0.5
  sft loragen_sft_noise --system-prompt --sampler-steps 5 --cond-noise 0.75
  sft loragen_sft_lowlr --system-prompt --lr 3e-5
  waitall
  for f in "$WORK"/train_loragen_sft*.log; do echo "== $f"; tail -n 2 "$f"; done
  mkdir -p "$WORK/configs"
  for d in "$CK"/loragen_sft*/; do [ -f "$d/config.json" ] && cp "$d/config.json" "$WORK/configs/$(basename "$d").json"
    [ -f "$d/probe.jsonl" ] && cp "$d/probe.jsonl" "$WORK/configs/$(basename "$d")_probe.jsonl"; done
  (cd "$WORK" && tar czf "$OUT/sft_logs.tgz" train_loragen_sft*.log configs subsets)
  echo "sft phase done at $((SECONDS - start)) s"
  ;;
eval_sft)
  # Validation, as served (description also as system prompt; `--system-prompt`): the incumbent
  # and every SFT checkpoint (one row each, 2 descriptions per task); the best wins (ties: the
  # incumbent). Then the winner's rows on test (+ in-distribution), once, if it is not the incumbent.
  # The rows named in SFT_CONTROLS (incumbent, variants) also get their conditioning controls on
  # validation (<name>_random, <name>_other): whether the description matters, also for a loser.
  qv="$WORK/q_validation_sft" qt="$WORK/q_test_sft"
  controls() { [[ " ${SFT_CONTROLS:-} " == *" $1 "* ]] || return 0
    gen "val_$1_controls" "$qv" --generator "$2" --task-set validation --rows "$1_random" "$1_other" --system-prompt \
      --num-descriptions 2; }
  cands=()
  candidate incumbent "$INIT" "$qv"
  controls incumbent "$INIT"
  # Every SFT checkpoint and its snapshots (<run>/snapshots/sft-<step>: row <run>_at<step>).
  for d in "$CK"/loragen_sft*/ "$CK"/loragen_sft*/snapshots/sft-*/; do
    [ -f "$d/config.json" ] || continue
    name=$(row_of "$d")
    candidate "$name" "$d" "$qv"
    controls "$name" "$d"
  done
  settle sft loragen_sft "$qt"
  # The task-count point of SFT (the 204-task run), on test, 1 description per task, as the curves.
  if [ "$win" != "$INIT" ] && [ -f "$CK/loragen_sft_n204/config.json" ]; then
    gen curve_sft_n204 "$qt" --generator "$CK/loragen_sft_n204" --task-set test --rows loragen_sft_n204 \
      --system-prompt --num-descriptions 1
    waitall
  fi
  for f in "$WORK"/eval_*.log; do echo "== $f"; tail -n 2 "$f"; done
  tar czf "$OUT/generations_sft.tgz" -C "$WORK" q_validation_sft choice_sft.json $(cd "$WORK" && ls eval_*.log) \
    $( [ -d "$qt" ] && echo q_test_sft )
  echo "eval_sft phase done at $((SECONDS - start)) s"
  ;;
sampler)
  # The sampler of the shipped checkpoint ($INIT) chosen again on validation, as served (description
  # also as system prompt, 2 descriptions per task): guidance x steps (SAMPLER_GUIDANCES,
  # SAMPLER_STEPS; the checkpoint's own setting among them). The best wins (ties: the checkpoint's
  # own setting) and is written into a copy of the checkpoint; if that is a new setting, its rows
  # on test (+ in-distribution), once, and the new config in $OUT.
  qv="$WORK/q_validation_sampler" qt="$WORK/q_test_sampler" ck="$CK/sampler"
  rm -rf "$ck" && mkdir -p "$ck" && cp "$INIT"/config.json "$INIT"/model.safetensors "$ck/"
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"  # once, before the readers
  for s in ${SAMPLER_STEPS:-5 10}; do  # one step count at a time: ten rows at once ran out of memory on an H100
    for g in ${SAMPLER_GUIDANCES:-1.0 1.5 2.0 3.0 4.0}; do
      gen "sampler_g${g}_s$s" "$qv" --generator "$INIT" --task-set validation --rows "loragen_g${g}_s$s" \
        --guidance "$g" --sampler-steps "$s" --system-prompt --num-descriptions 2
    done
    waitall
  done
  echo "validation done at $((SECONDS - start)) s"
  before=$($PY -c "import json; print(json.load(open('$ck/config.json'))['fingerprint'])")
  $PY -m benchmarks.quality choose --tasks data/sni/tasks --validation "$qv" --checkpoint "$ck" --system-prompt-fixed \
    --out "$WORK/choice_sampler.json" | tee "$OUT/choice_sampler.txt"
  after=$($PY -c "import json; print(json.load(open('$ck/config.json'))['fingerprint'])")
  if [ "$after" != "$before" ]; then
    test_rows loragen_sampler "$qt" "$ck"
    waitall
    cp "$ck/config.json" "$OUT/loragen_sampler_config.json"
  fi
  for f in "$WORK"/eval_*sampler*.log; do echo "== $f"; tail -n 2 "$f"; done
  tar czf "$OUT/generations_sampler.tgz" -C "$WORK" q_validation_sampler choice_sampler.json \
    $(cd "$WORK" && ls eval_*sampler*.log) $( [ -d "$qt" ] && echo q_test_sampler )
  echo "sampler phase done at $((SECONDS - start)) s"
  ;;
anchors|variants)
  # Served-time variants of $INIT, on validation as served (description also as system prompt, 2
  # descriptions per task), against $INIT as served. VARIANTS: row names that say their options:
  # anchor_a<ALPHA>_k<K> (--anchor-blend ALPHA --anchor-k K: the description blended with its
  # nearest training descriptions, anchors.py), scale_<S> (--adapter-scale S: every adapter's dW
  # times S). `anchors` is `variants` with the blends of quality_anchors.md. The best validation EM
  # wins (ties: the incumbent); the winner's rows on test (+ in-distribution), once, as
  # loragen_anchor* / loragen_scale*.
  if [ "$phase" = anchors ]; then
    VARIANTS=${VARIANTS:-"anchor_a0.0_k1 anchor_a0.0_k5 anchor_a0.5_k5 anchor_a0.75_k5 anchor_a0.9_k5"}
  fi
  variant_opts() { case $1 in
    anchor_a*_k*) local a=${1#anchor_a}; echo "--anchor-blend ${a%%_k*} --anchor-k ${a#*_k}" ;;
    scale_*) echo "--adapter-scale ${1#scale_}" ;;
    *) echo "unknown variant $1 (anchor_a<ALPHA>_k<K> | scale_<S>)" >&2; return 1 ;;
  esac; }
  for v in ${VARIANTS:?set VARIANTS}; do variant_opts "$v" > /dev/null; done  # a typo fails before any GPU work
  qv="$WORK/q_validation_$phase" qt="$WORK/q_test_$phase"
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"  # once, before the readers
  cands=(--candidate "incumbent=$INIT")
  gen "val_${phase}_incumbent" "$qv" --generator "$INIT" --task-set validation --rows incumbent --system-prompt \
    --num-descriptions 2
  n=1
  for v in $VARIANTS; do
    gen "val_${phase}_$v" "$qv" --generator "$INIT" --task-set validation --rows "$v" --system-prompt \
      --num-descriptions 2 $(variant_opts "$v")
    cands+=(--candidate "$v=$INIT")
    n=$((n + 1)); if [ $((n % 3)) = 0 ]; then waitall; fi  # three row processes at a time
  done
  waitall
  echo "validation done at $((SECONDS - start)) s"
  win=$(choose_best "$phase" chosen "$qv" "${cands[@]}")
  if [ "$win" != incumbent ]; then
    test_rows "loragen_${win%%_*}" "$qt" "$INIT" $(variant_opts "$win")
    waitall
  fi
  for f in "$WORK"/eval_*"$phase"*.log "$WORK"/eval_loragen_"${win%%_*}"*.log; do
    if [ -f "$f" ]; then echo "== $f"; tail -n 2 "$f"; fi
  done
  tar czf "$OUT/generations_$phase.tgz" -C "$WORK" "q_validation_$phase" "choice_$phase.json" \
    $(cd "$WORK" && ls eval_*"$phase"*.log eval_loragen_"${win%%_*}"*.log 2>/dev/null) \
    $( [ -d "$qt" ] && echo "q_test_$phase" )
  echo "$phase phase done at $((SECONDS - start)) s"
  ;;
latency)
  # Issue 12's generator figures for $INIT: the CUDA-graph tests (sampler, encoder, the pinned copy
  # to the host), then description -> PEFT bytes at 5 and 20 steps, one and 32 descriptions.
  timeout $(( $(left) - 10 )) $PY -m pytest -q --noconftest tests/test_graphs.py > "$OUT/test_graphs.log" 2>&1 || true
  tail -n 3 "$OUT/test_graphs.log"
  timeout $(( $(left) > 15 ? $(left) - 10 : 5 )) $PY -m benchmarks.generation_latency --device cuda \
    --checkpoint "$INIT" --steps 5,20 --batch 32 --repeats 9 --out "$OUT/generation_latency_cuda.json" \
    2>&1 | grep -v '%|' | tail -n 20 || echo "latency benchmark: not finished"
  echo "latency phase done at $((SECONDS - start)) s"
  ;;
sft_eval)
  # Both in one call (a machine released between calls loses /tmp): SFT of $SFT_ONLY (default: plain
  # SFT continued with the shipped sampler, against the contrastive term and the conditioning
  # noise) for SFT_DEADLINE_S, then eval_sft in the time left.
  SFT_ONLY=${SFT_ONLY:-"loragen_sft_s5 loragen_sft_contrast loragen_sft_noise"} DEADLINE_S=${SFT_DEADLINE_S:-290} bash "$0" sft
  DEADLINE_S=$(left) bash "$0" eval_sft
  ;;
sft_curve)
  # How many SFT steps, chosen on validation: LoRAGen SFT from the reconstruction-trained checkpoint
  # $RECON (not from a shipped SFT one; the default: 40ea66f850f1, the default before SFT, staged by
  # the caller) through the sampler the shipped checkpoint is served with (5 steps, guidance 1), at
  # each learning rate of CURVE_LRS, writing snapshots at CURVE_SNAPSHOTS; then eval_sft scores the
  # incumbent, every run and every snapshot on validation as served, and the best on test, once.
  RECON=${RECON:-$CK/recon}
  [ "$RECON" != "$CK/recon" ] || staged_checkpoint recon
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"  # once, before the readers
  for lr in ${CURVE_LRS:-3e-4 1e-4}; do
    run "loragen_sft_lr$lr" $PY -m generator.training.sft --kind loragen --init "$RECON" --tasks data/sni/tasks \
      --out "$CK/loragen_sft_lr$lr" --device $DEV --no-progress --threads 2 --resume --system-prompt \
      --sampler-steps 5 --guidance 1.0 --lr "$lr" --max-seconds $(( ${SFT_DEADLINE_S:-300} - (SECONDS - start) )) \
      "${CURVE[@]}"
  done
  waitall
  for f in "$WORK"/train_loragen_sft*.log; do echo "== $f"; tail -n 2 "$f"; done
  mkdir -p "$WORK/configs"
  for d in "$CK"/loragen_sft*/; do [ -f "$d/probe.jsonl" ] && cp "$d/probe.jsonl" "$WORK/configs/$(basename "$d")_probe.jsonl"; done
  (cd "$WORK" && tar czf "$OUT/sft_logs.tgz" train_loragen_sft*.log configs)
  echo "sft done at $((SECONDS - start)) s"
  # CURVE_EVAL=0: training only (a run longer than one call; `eval_sft` then runs in the next call
  # on the warm machine, where $CK is kept).
  [ "${CURVE_EVAL:-1}" = 1 ] || exit 0
  DEADLINE_S=$(left) bash "$0" eval_sft
  ;;
soup)
  # Weight averages (`generator.soup`) of checkpoints in $CK, e.g. an SFT run's tail of snapshots:
  # SOUPS="name:CK CK ...;name:CK CK ..." (checkpoints relative to $CK, or absolute). Each soup is a candidate on
  # validation as served, against the incumbent (its row reused from eval_sft if there); the best
  # (ties: the incumbent) gets its rows on test, once.
  # A soup is made again on every call (seconds): a name reused with other sources gets a new
  # fingerprint, and `choose-checkpoint` refuses a validation row left from the old one.
  qv="$WORK/q_validation_soup" qt="$WORK/q_test_soup"
  soup_specs "${SOUPS:?set SOUPS}"
  mkdir -p "$qv" && cp -n "$WORK/q_validation_sft/incumbent.jsonl" "$qv/" 2>/dev/null || true
  cands=()
  candidate incumbent "$INIT" "$qv" val_soup_incumbent
  for i in "${!soup_names[@]}"; do
    make_soup "$i"
    candidate "${soup_names[$i]}" "$CK/${soup_names[$i]}" "$qv"
  done
  settle soup loragen_soup "$qt"
  for f in "$WORK"/eval_*soup*.log; do echo "== $f"; tail -n 2 "$f"; done
  tar czf "$OUT/generations_soup.tgz" -C "$WORK" q_validation_soup choice_soup.json $(cd "$WORK" && ls eval_*soup*.log) \
    $( [ -d "$qt" ] && echo q_test_soup )
  echo "soup phase done at $((SECONDS - start)) s"
  ;;
named_labels)
  # Issue 14's format lever: LoRAGen SFT continued from $INIT (as served: system prompt, its sampler)
  # where a closed-label task's description names its labels with probability NAMED_P (0.5;
  # `--name-labels`), and the control, the same schedule without; side by side, SFT_STEPS (250) at
  # SFT_LR (5e-5), snapshots at NAMED_SNAPSHOTS (150); NAMED_ARMS ("plain named") says which. Training
  # only: named_labels_eval follows in the next call on the warm machine ($CK is kept). NAMED_INIT:
  # where SFT starts instead of $INIT (a folder, or the name of a checkpoint staged for
  # `staged_checkpoint`, e.g. recon); NAMED_SFT_ARGS: more `sft` options (e.g. the served sampler,
  # "--sampler-steps 5 --guidance 1.0", for a start whose config has another). Arm user (not in the
  # default arms): the training tasks' user-style descriptions drawn with probability USER_P (0.5;
  # `--user-style`) instead, for user_style_eval.
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"  # once, before the readers
  start_ck=${NAMED_INIT:-$INIT}
  if [[ $start_ck != */* ]]; then staged_checkpoint "$start_ck"; start_ck=$CK/$start_ck; fi
  common=(--kind loragen --init "$start_ck" --tasks data/sni/tasks --device $DEV --no-progress --threads 2 --resume
    --system-prompt --steps "${SFT_STEPS:-250}" --lr "${SFT_LR:-5e-5}" --snapshots ${NAMED_SNAPSHOTS:-150}
    --probe-every 50 --max-seconds $(( $(left) > 60 ? $(left) - 40 : 20 )) ${NAMED_SFT_ARGS:-})
  [ "${DRY:-0}" = 1 ] && common+=("${SFT_L[@]}")
  arms=" ${NAMED_ARMS:-plain named} "
  [[ $arms == *" plain "* ]] && run loragen_sft_plain $PY -m generator.training.sft --out "$CK/loragen_sft_plain" "${common[@]}"
  [[ $arms == *" named "* ]] && run loragen_sft_named $PY -m generator.training.sft --out "$CK/loragen_sft_named" \
    "${common[@]}" --name-labels "${NAMED_P:-0.5}"
  [[ $arms == *" user "* ]] && run loragen_sft_user $PY -m generator.training.sft --out "$CK/loragen_sft_user" \
    "${common[@]}" --user-style "${USER_P:-0.5}"
  waitall
  for f in "$WORK"/train_loragen_sft_{plain,named,user}.log; do [ -f "$f" ] && { echo "== $f"; tail -n 3 "$f"; }; done
  mkdir -p "$WORK/configs"
  for d in "$CK"/loragen_sft_{plain,named,user}/; do [ -f "$d/probe.jsonl" ] && cp "$d/probe.jsonl" "$WORK/configs/$(basename "$d")_probe.jsonl"; done
  (cd "$WORK" && tar czf "$OUT/named_labels_logs.tgz" $(ls train_loragen_sft_{plain,named,user}.log 2>/dev/null) configs)
  echo "named_labels phase done at $((SECONDS - start)) s"
  ;;
named_labels_eval)
  # Validation as served (2 descriptions per task) of the incumbent and every checkpoint of
  # named_labels (final and snapshots): with the descriptions as given (all validation tasks; folder
  # q_validation_named) and naming their labels (the closed-label tasks, `--name-labels`; folder
  # q_validation_named_labels, with the base model given the same system prompts); NAMED_SOUPS
  # adds weight averages as candidates (soup_specs; e.g. "inc_named:INIT loragen_sft_named"; sources
  # staged by the caller are named in NAMED_STAGED, e.g. "e8f7", made by `staged_checkpoint`). The rule, fixed
  # before any result (`benchmarks.quality choose-named`; NAMED_EVAL_SNAPSHOTS=0 leaves the arms'
  # snapshots out of the candidates): of the candidates whose EM with the
  # descriptions as given is at least the incumbent's - 0.5, the best EM naming labels wins if it
  # beats the incumbent's by at least 1.0; else the incumbent stays. On test, once: the incumbent
  # and the base model with descriptions naming labels; a winner's rows as served (table, controls,
  # user-style) and naming labels, and its weights back in $OUT.
  qv="$WORK/q_validation_named" ql="$WORK/q_validation_named_labels" qt="$WORK/q_test_named"
  # Rows of an earlier call (NAMED_ROWS: a folder with q_validation_named*/ and q_test_named/) are
  # not generated again: a test row is scored once; `choose-named` refuses a stale candidate row.
  if [ -n "${NAMED_ROWS:-}" ]; then mkdir -p "$WORK" && { cp -rn "$NAMED_ROWS"/q_* "$WORK"/ || true; }; fi
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"
  closed=$($PY -c "
from generator.data.sni import train_labels
from generator.data.sni import load_splits, load_tasks
print(' '.join(sorted(train_labels(load_tasks('data/sni/tasks', load_splits('data/sni/tasks').validation)))))")
  [ "${DRY:-0}" = 1 ] && closed=$(printf '%s\n' "${DRY_TASKS[@]:8:2}" | tr '\n' ' ')
  [ -n "$closed" ] || { echo "no closed-label validation task" >&2; exit 2; }
  cands=("incumbent=$INIT")
  snaps=("$CK"/loragen_sft_{plain,named}/snapshots/sft-*/)
  [ "${NAMED_EVAL_SNAPSHOTS:-1}" = 1 ] || snaps=()  # 0: the final checkpoints only
  add_finished cands "$CK"/loragen_sft_{plain,named}/ "${snaps[@]}"
  for name in ${NAMED_STAGED:-}; do staged_checkpoint "$name"; done  # soup sources staged by the caller
  add_soups cands "${NAMED_SOUPS:-}"  # more candidates: weight averages ("name:CK CK;...", soup_specs)
  gen named_val_system "$ql" --task-set validation --rows system --name-labels --only $closed
  for c in "${cands[@]}"; do
    name=${c%%=*} ck=${c#*=}
    gen "named_val_$name" "$qv" --generator "$ck" --task-set validation --rows "$name" --system-prompt --num-descriptions 2
    gen "named_val_${name}_labels" "$ql" --generator "$ck" --task-set validation --rows "$name" --system-prompt \
      --num-descriptions 2 --name-labels --only $closed
    if [ ${#pids[@]} -ge "${MAX_ROWS:-6}" ]; then waitall; fi
  done
  waitall
  echo "validation done at $((SECONDS - start)) s"
  $PY -m benchmarks.quality choose-named --tasks data/sni/tasks --plain "$qv" --named "$ql" \
    $(printf -- '--candidate %s ' "${cands[@]}") --out "$WORK/choice_named.json" | tee "$OUT/choice_named.txt"
  win=$($PY -c "import json; print(json.load(open('$WORK/choice_named.json'))['checkpoint'])")
  # What naming labels gives the incumbent and the base model on test, once, whatever the choice.
  gen incumbent_labels "$qt" --generator "$INIT" --task-set test --rows incumbent_labels --system-prompt --name-labels
  gen system_labels "$qt/system_labels" --task-set test --rows system --name-labels
  if [ "$win" != "$INIT" ]; then
    test_rows loragen_named "$qt" "$win"
    gen loragen_named_labels "$qt" --generator "$win" --task-set test --rows loragen_named_labels --system-prompt \
      --name-labels
    send_back "$win" loragen_named
  fi
  waitall
  for f in "$WORK"/eval_named_val_*.log "$WORK"/eval_loragen_named*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 2 "$f"; }; done
  tar czf "$OUT/generations_named.tgz" -C "$WORK" q_validation_named q_validation_named_labels choice_named.json \
    $(cd "$WORK" && ls eval_named_val_*.log eval_loragen_named*.log eval_incumbent_labels.log eval_system_labels.log 2>/dev/null) \
    $( [ -d "$qt" ] && echo q_test_named )
  echo "named_labels_eval phase done at $((SECONDS - start)) s"
  ;;
user_style_eval)
  # Issue 14's lever "user-style descriptions" in training: validation as served (2 descriptions per
  # task) of the incumbent and the candidates, with the evaluation descriptions (folder
  # q_validation_user_eval) and with the validation tasks' user-style descriptions (q_validation_user).
  # Candidates: arm user of named_labels (final; USER_EVAL_SNAPSHOTS=1 adds its snapshots) and the
  # weight averages of USER_SOUPS (soup_specs; sources staged by the caller named in USER_STAGED, as
  # NAMED_STAGED). Diagnostics, no candidates: arm plain (the same run without user-style
  # descriptions, if trained) and USER_DIAG_SOUPS. The rule, fixed before any result
  # (`choose-named --lever user_style`): of the candidates whose EM with the evaluation descriptions
  # is at least the incumbent's - 0.5, the best user-style EM wins if it beats the incumbent's by at
  # least 1.0; else the incumbent stays. A winner's rows on test, once (table, controls, user-style),
  # and its weights back in $OUT.
  qv="$WORK/q_validation_user_eval" qu="$WORK/q_validation_user" qt="$WORK/q_test_user"
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"
  for name in ${USER_STAGED:-}; do staged_checkpoint "$name"; done
  cands=("incumbent=$INIT") diags=()
  snaps=(); [ "${USER_EVAL_SNAPSHOTS:-0}" = 1 ] && snaps=("$CK"/loragen_sft_user/snapshots/sft-*/)
  add_finished cands "$CK"/loragen_sft_user/ "${snaps[@]}"
  add_finished diags "$CK"/loragen_sft_plain/
  add_soups cands "${USER_SOUPS:-}"
  add_soups diags "${USER_DIAG_SOUPS:-}"
  for c in "${cands[@]}" "${diags[@]}"; do served_rows user_val "${c%%=*}" "${c#*=}" "$qv" "$qu"; done
  waitall
  echo "validation done at $((SECONDS - start)) s"
  $PY -m benchmarks.quality choose-named --lever user_style --tasks data/sni/tasks --plain "$qv" --named "$qu" \
    $(printf -- '--candidate %s ' "${cands[@]}") --out "$WORK/choice_user.json" | tee "$OUT/choice_user.txt"
  win=$($PY -c "import json; print(json.load(open('$WORK/choice_user.json'))['checkpoint'])")
  if [ "$win" != "$INIT" ]; then
    test_rows loragen_user_style "$qt" "$win"
    waitall
    send_back "$win" loragen_user_style
  fi
  for f in "$WORK"/eval_user_val_*.log "$WORK"/eval_loragen_user_style*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 2 "$f"; }; done
  tar czf "$OUT/generations_user.tgz" -C "$WORK" q_validation_user_eval q_validation_user choice_user.json \
    $(cd "$WORK" && ls eval_user_val_*.log eval_loragen_user_style*.log 2>/dev/null) $( [ -d "$qt" ] && echo q_test_user )
  echo "user_style_eval phase done at $((SECONDS - start)) s"
  ;;
fit)
  # Issue 14, where the in-distribution gap comes from: does the generator fit the tasks it trains
  # on, given an oracle's budget of examples per task? LoRAGen SFT continued from $INIT as served
  # (system prompt, its sampler), side by side: on the 32 in-distribution tasks alone (arm id32:
  # every task in every step, 8 x FIT_STEPS examples each, 2x an oracle's 1600 at 400 steps) and on
  # all training tasks (arm all: ~0.75 examples per task per step), FIT_STEPS (400) at FIT_LR
  # (1e-4), snapshots at FIT_SNAPSHOTS (100 200). Training only: fit_eval follows in the next call
  # on the warm machine ($CK is kept).
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"  # once, before the readers
  mkdir -p "$WORK/subsets"
  $PY -c "from generator.data.sni import load_splits; print('\n'.join(load_splits('data/sni/tasks').in_distribution_eval))" \
    > "$WORK/subsets/id32.txt"
  common=(--kind loragen --init "$INIT" --tasks data/sni/tasks --device $DEV --no-progress --threads 2 --resume
    --system-prompt --steps "${FIT_STEPS:-400}" --lr "${FIT_LR:-1e-4}" --snapshots ${FIT_SNAPSHOTS:-100 200}
    --max-seconds $(( $(left) > 60 ? $(left) - 40 : 20 )))
  idfile="$WORK/subsets/id32.txt"
  if [ "${DRY:-0}" = 1 ]; then common+=(--steps 2 --tasks-per-step 2 --examples-per-task 2 --sampler-steps 3 --snapshots 1)
    idfile="$WORK/subsets/id2.txt" && head -n 2 "$WORK/subsets/id32.txt" > "$idfile"; fi
  run loragen_fit_id32 $PY -m generator.training.sft --out "$CK/loragen_fit_id32" "${common[@]}" --tasks-file "$idfile"
  run loragen_fit_all $PY -m generator.training.sft --out "$CK/loragen_fit_all" "${common[@]}"
  waitall
  for f in "$WORK"/train_loragen_fit_*.log; do echo "== $f"; tail -n 3 "$f"; done
  (cd "$WORK" && tar czf "$OUT/fit_logs.tgz" train_loragen_fit_*.log subsets)
  echo "fit phase done at $((SECONDS - start)) s"
  ;;
fit_eval)
  # The in-distribution rows (32 training tasks, 3 unseen descriptions each, as the table) of the
  # incumbent and of every checkpoint and snapshot of both fit arms; validation rows (2 descriptions
  # per task, as served) of the incumbent, of arm all (final and snapshots: the candidates) and of
  # arm id32's final (a diagnostic, no candidate). The rule, fixed before any result: the best
  # mean validation EM among the incumbent and arm all's checkpoints wins (ties: the incumbent);
  # a winner gets its rows on test, once, and its weights back in $OUT.
  qv="$WORK/q_validation_fit" qi="$WORK/q_id_fit" qt="$WORK/q_test_fit"
  idonly=(); [ "${DRY:-0}" = 1 ] && idonly=(--only $(head -n 2 "$WORK/subsets/id32.txt"))
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"
  cands=()
  candidate incumbent "$INIT" "$qv" val_fit_incumbent
  gen id_fit_incumbent "$qi" --generator "$INIT" --task-set in_distribution --rows incumbent --system-prompt "${idonly[@]}"
  for d in "$CK"/loragen_fit_{all,id32}/ "$CK"/loragen_fit_{all,id32}/snapshots/sft-*/; do
    [ -f "$d/config.json" ] && [ ! -f "$d/train_state.pt" ] || continue  # a run its deadline stopped is no candidate
    name=$(row_of "$d"); name=${name#loragen_}
    gen "id_$name" "$qi" --generator "$d" --task-set in_distribution --rows "$name" --system-prompt "${idonly[@]}"
    if [[ $name == fit_all* ]]; then candidate "$name" "${d%/}" "$qv"
    elif [ "$name" = fit_id32 ]; then
      gen "val_$name" "$qv" --generator "$d" --task-set validation --rows "$name" --system-prompt --num-descriptions 2
    fi
    if [ ${#pids[@]} -ge "${MAX_ROWS:-6}" ]; then waitall; fi
  done
  settle fit loragen_fit "$qt"
  for f in "$WORK"/eval_*fit*.log; do echo "== $f"; tail -n 2 "$f"; done
  tar czf "$OUT/generations_fit.tgz" -C "$WORK" q_validation_fit q_id_fit choice_fit.json \
    $(cd "$WORK" && ls eval_*fit*.log) $( [ -d "$qt" ] && echo q_test_fit )
  echo "fit_eval phase done at $((SECONDS - start)) s"
  ;;
all_tasks)
  # Issue 14's lever "more distinct training tasks" and the task-count curve's missing point: the
  # reconstruction stage saw the oracles of 204 tasks (the train split before 138 were added), SFT
  # all 342. Rerun until it prints "all_tasks done" (each call resumes what the last left in $WORK
  # and $CK, on the warm machine):
  #   1. the oracle LoRAs of the 342 training tasks (`oracles`' recipe, no multi-task LoRA; an
  #      adapter depends only on its task and the seed, so the 204 are the first run's again);
  #   2. LoRAGen reconstruction on all of them ($GEN, `train`'s recipe): checkpoint loragen_all;
  #   3. side by side: LoRAGen SFT from it by the shipped SFT ingredient's recipe (SFT_STEPS 250 at
  #      SFT_LR 5e-5 through the served sampler, 5 steps at guidance 1, snapshot at 150), seed 0
  #      (loragen_sft_all) and seed 1 (loragen_sft_all_s1), and loragen_all's curve rows
  #      loragen_n342 (one description per task, its own sampler, as the curve's other points) on
  #      validation and test.
  # all_tasks_eval follows.
  #   ALL_RUN (default all) names the runs: reconstruction loragen_$ALL_RUN, SFT loragen_sft_$ALL_RUN[_s1],
  #   curve rows loragen_n<tasks> (all) or loragen_n<tasks>_<ALL_RUN without all_>; ALL_GEN: more
  #   reconstruction options after $GEN (a later option wins); ALL_SFT=0: stop after the
  #   reconstruction's rows (curve, and ALL_ID=1's recon_diag_rows).
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"
  all_tasks_of_run
  done_oracles() { local n=0 t; for t in "${train_tasks[@]}"; do [ -f "$lib/$t/descriptions.json" ] && n=$((n + 1)); done
    echo $n; }
  if [ "$(done_oracles)" -lt ${#train_tasks[@]} ]; then
    timeout "$(left)" $PY -m generator.training.oracles train --tasks data/sni/tasks --out "$WORK/oracles" --device $DEV \
      "${ORACLE[@]}" --only "${train_tasks[@]}" 2>&1 | tee -a "$WORK/oracles.log" | grep --line-buffered -v '%|' || true
    echo "oracles: $(done_oracles) of ${#train_tasks[@]} training tasks at $((SECONDS - start)) s"
    [ "$(done_oracles)" -eq ${#train_tasks[@]} ] || exit 0
  fi
  cp "$WORK/oracles/oracles.json" "$OUT/all_tasks_oracles.json" 2>/dev/null || true
  recon=loragen_$ALL_RUN sft=loragen_sft_$ALL_RUN
  run $recon $PY -m generator train --kind loragen --out "$CK/$recon" --library "$lib" --device $DEV \
    --no-progress --threads 2 --resume "${GEN[@]}" ${ALL_GEN:-}
  waitall
  [ -f "$CK/$recon/config.json" ] && [ ! -f "$CK/$recon/train_state.pt" ] || { tail -n 3 "$WORK/train_$recon.log"; exit 0; }
  echo "$recon trained at $((SECONDS - start)) s"
  for set in validation test; do  # the task-count curve's point (benchmarks.quality.curves)
    gen "curve_${ALL_RUN}_$set" "$WORK/q_$set" --generator "$CK/$recon" --task-set $set --rows "$curve_row" --num-descriptions 1
  done
  [ "${ALL_ID:-0}" = 1 ] && recon_diag_rows  # beside SFT: the reconstruction's answer even if SFT gets no time
  if [ "${ALL_SFT:-1}" = 0 ]; then  # the reconstruction and its rows only
    waitall && all_tasks_archive && echo "all_tasks ($ALL_RUN): reconstruction rows done at $((SECONDS - start)) s, no SFT"
    exit 0
  fi
  common=(--kind loragen --init "$CK/$recon" --tasks data/sni/tasks --device $DEV --no-progress --threads 2 --resume
    --system-prompt --sampler-steps 5 --guidance 1.0 --steps "${SFT_STEPS:-250}" --lr "${SFT_LR:-5e-5}"
    --snapshots ${ALL_SNAPSHOTS:-150} --probe-every 50 --max-seconds $(( $(left) > 60 ? $(left) - 40 : 20 )))
  [ "${DRY:-0}" = 1 ] && common+=("${SFT_L[@]}" --snapshots 1)
  run $sft $PY -m generator.training.sft --out "$CK/$sft" "${common[@]}"
  run ${sft}_s1 $PY -m generator.training.sft --out "$CK/${sft}_s1" "${common[@]}" --seed 1
  waitall
  mkdir -p "$WORK/configs"
  for r in $sft ${sft}_s1; do tail -n 3 "$WORK/train_$r.log"
    [ -f "$CK/$r/probe.jsonl" ] && cp "$CK/$r/probe.jsonl" "$WORK/configs/${r}_probe.jsonl"; done
  all_tasks_archive
  for r in $sft ${sft}_s1; do [ -f "$CK/$r/config.json" ] && [ ! -f "$CK/$r/train_state.pt" ] || exit 0; done
  echo "all_tasks ($ALL_RUN) done at $((SECONDS - start)) s"
  ;;
all_tasks_eval)
  # all_tasks' SFT runs as candidates for the default, on validation as served (2 descriptions per
  # task), beside the incumbent (the mean of two SFT runs from the 204-task reconstruction): row
  # all (loragen_sft_all, seed 0) alone, and soup_all, the mean of both seeds (runs from another
  # reconstruction share no starting point with the incumbent's, so no average with those).
  # Diagnostics, no candidates: all_s1 (seed 1) alone, and the candidates with the validation
  # tasks' user-style descriptions. The rule, fixed before any result: the best mean validation EM wins if it beats
  # the incumbent's by at least 0.5 (the run-to-run noise); else the incumbent stays. A winner's
  # rows on test, once (table, controls, user-style), and its weights back in $OUT.
  # ALL_RUN as in all_tasks: rows $ALL_RUN, soup_$ALL_RUN, ${ALL_RUN}_s1; folders and files named after
  # it. ALL_ID=1 adds diagnostics: $ALL_RUN on the in-distribution tasks as served, and
  # recon_diag_rows if all_tasks did not make them.
  r=$ALL_RUN recon=loragen_$ALL_RUN sft=loragen_sft_$ALL_RUN
  qv="$WORK/q_validation_$r" qu="$WORK/q_validation_${r}_user" qt="$WORK/q_test_$r" qd="$WORK/q_diag_$r"
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"
  all_tasks_of_run
  cands=("incumbent=$INIT") diags=()
  add_finished cands "$CK/$sft/"
  add_finished diags "$CK/${sft}_s1/"
  [ ${#cands[@]} -eq 2 ] && [ ${#diags[@]} -eq 1 ] || { echo "the SFT runs are not finished: run all_tasks first" >&2; exit 2; }
  add_soups cands "$r:$sft ${sft}_s1"
  for c in "${cands[@]}"; do served_rows ${r}_val "${c%%=*}" "${c#*=}" "$qv" "$qu"; done
  served_rows ${r}_val "${diags[0]%%=*}" "${diags[0]#*=}" "$qv"  # <run>_s1: evaluation descriptions only
  if [ "${ALL_ID:-0}" = 1 ]; then
    recon_diag_rows  # made by all_tasks already: skipped
    gen "${r}_diag_id" "$qd/in_distribution" --generator "$CK/$sft" --task-set in_distribution --rows "$r" --system-prompt \
      "${id_only[@]}"
  fi
  waitall
  echo "validation done at $((SECONDS - start)) s"
  win=$(choose_best $r checkpoint "$qv" --margin 0.5 $(printf -- '--candidate %s ' "${cands[@]}"))
  if [ "$win" != "$INIT" ]; then
    row=loragen_$($PY -c "import json; print(json.load(open('$WORK/choice_$r.json'))['chosen'])")
    test_rows "$row" "$qt" "$win"
    waitall
    send_back "$win" "$row"
  fi
  for f in "$WORK"/eval_${r}_*.log "$WORK"/eval_loragen_*${r}*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 2 "$f"; }; done
  tar czf "$OUT/generations_$r.tgz" -C "$WORK" q_validation_$r q_validation_${r}_user choice_$r.json \
    $(cd "$WORK" && ls q_validation/$curve_row.jsonl q_test/$curve_row.jsonl eval_${r}_*.log eval_loragen_*${r}*.log \
      2>/dev/null) $( [ -d "$qt" ] && echo q_test_$r ) $( [ -d "$qd" ] && echo q_diag_$r )
  echo "all_tasks_eval phase done at $((SECONDS - start)) s"
  ;;
t2l_sft)
  # Issue 14: Text-to-LoRA trained by SFT at scale. The T2L (SFT) row of 2026-12-04 (9e9e8072c283:
  # 204 tasks, no system prompt, stopped by its call before 600 steps, never chosen on validation)
  # tied the shipped LoRAGen on test (11.4 EM). Here: T2L from scratch by SFT on all 342 training
  # tasks, the description also as the system prompt (as served), its standardiser's statistics
  # copied from $INIT (those of the 204-task oracle library; no oracles needed), one run per
  # learning rate in T2L_LRS (default "2e-4 5e-4") side by side, T2L_STEPS (1500) steps with
  # snapshots at T2L_SNAPSHOTS (250 500 750 1000), probing the validation tasks every 100 steps.
  # Rerun on the warm machine until it prints "t2l_sft done" ($CK keeps the training states);
  # t2l_sft_eval follows.
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"  # once, before the readers
  steps=${T2L_STEPS:-1500} snaps=${T2L_SNAPSHOTS:-250 500 750 1000} dry=()
  # the dry run: 2 steps, snapshot 1, 4 training tasks, one probe task
  [ "${DRY:-0}" = 1 ] && steps=2 snaps=1 dry=("${SFT_L[@]:8}" --tasks-per-step 2 --examples-per-task 2)
  for lr in ${T2L_LRS:-2e-4 5e-4}; do
    run "t2l_sft_lr$lr" $PY -m generator.training.sft --kind t2l --stats-from "$INIT" --tasks data/sni/tasks \
      --out "$CK/t2l_sft_lr$lr" --device $DEV --no-progress --threads 2 --resume --system-prompt --lr "$lr" \
      --steps "$steps" --snapshots $snaps --probe-every 100 --max-seconds $(( $(left) > 60 ? $(left) - 40 : 20 )) \
      "${dry[@]}"
  done
  waitall
  mkdir -p "$WORK/configs"
  for d in "$CK"/t2l_sft_lr*/; do r=$(basename "$d"); tail -n 3 "$WORK/train_$r.log" || true
    [ -f "$d/probe.jsonl" ] && cp "$d/probe.jsonl" "$WORK/configs/${r}_probe.jsonl"; done
  (cd "$WORK" && tar czf "$OUT/t2l_sft_logs.tgz" train_t2l_sft_lr*.log configs)
  for d in "$CK"/t2l_sft_lr*/; do [ ! -f "$d/train_state.pt" ] || { echo "t2l_sft: not finished, rerun"; exit 0; }; done
  echo "t2l_sft done at $((SECONDS - start)) s"
  ;;
t2l_sft_eval)
  # t2l_sft's checkpoints as candidates for the default, on validation as served (the description
  # also as system prompt, 2 descriptions per task), beside the incumbent $INIT: every snapshot of
  # every run and each finished run (rows t2l_sft_lr<lr>[_at<step>]); a run still unfinished
  # competes with its snapshots. Diagnostics, no part of the rule: the finished runs with the
  # validation tasks' user-style descriptions, and on the in-distribution tasks. The rule, fixed
  # before any result: the best mean validation EM wins if it beats the incumbent's by at least 0.5;
  # else the incumbent stays. A winner's rows on test, once (table, controls, user-style), and its
  # weights back in $OUT.
  qv="$WORK/q_validation_t2l" qu="$WORK/q_validation_t2l_user" qt="$WORK/q_test_t2l" qd="$WORK/q_id_t2l"
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"
  cands=("incumbent=$INIT") finals=()
  add_finished cands "$CK"/t2l_sft_lr*/snapshots/sft-*/
  add_finished finals "$CK"/t2l_sft_lr*/
  cands+=("${finals[@]}")
  [ ${#cands[@]} -gt 1 ] || { echo "no T2L SFT checkpoint: run t2l_sft first" >&2; exit 2; }
  id_only=() && [ "${DRY:-0}" = 1 ] && id_only=(--only "$($PY -c "from generator.data.sni import load_splits
print(load_splits('data/sni/tasks').in_distribution_eval[0])")")
  for c in "${cands[@]}"; do served_rows t2l_val "${c%%=*}" "${c#*=}" "$qv"; done
  for c in "${finals[@]}"; do
    gen "t2l_val_${c%%=*}_user" "$qu" --generator "${c#*=}" --task-set validation --rows "${c%%=*}" --system-prompt \
      --user-descriptions
    gen "t2l_id_${c%%=*}" "$qd" --generator "${c#*=}" --task-set in_distribution --rows "${c%%=*}" --system-prompt \
      "${id_only[@]}"
    if [ ${#pids[@]} -ge "${MAX_ROWS:-6}" ]; then waitall; fi
  done
  waitall
  echo "validation done at $((SECONDS - start)) s"
  win=$(choose_best t2l checkpoint "$qv" --margin 0.5 $(printf -- '--candidate %s ' "${cands[@]}"))
  if [ "$win" != "$INIT" ]; then
    row=$($PY -c "import json; print(json.load(open('$WORK/choice_t2l.json'))['chosen'])")
    test_rows "$row" "$qt" "$win"
    waitall
    send_back "$win" "$row"
  fi
  for f in "$WORK"/eval_t2l_*.log "$WORK"/eval_t2l_sft_*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 2 "$f"; }; done
  tar czf "$OUT/generations_t2l.tgz" -C "$WORK" q_validation_t2l choice_t2l.json $(cd "$WORK" && ls -d eval_t2l_*.log \
    eval_t2l_sft_*.log q_validation_t2l_user q_id_t2l q_test_t2l 2>/dev/null | sort -u)
  echo "t2l_sft_eval phase done at $((SECONDS - start)) s"
  ;;
winner_test_rows)
  # A new default chosen elsewhere (e.g. a weight average made and chosen on validation on the
  # CPU), staged as WINNER (`staged_checkpoint`: /tmp/stage/files/<WINNER>_model.safetensors and
  # .devtools/<WINNER>/config.json): its rows on test, once, as the phases above give a winner's
  # (as served on test + in-distribution, its controls, user-style descriptions), and naming
  # labels (`--name-labels`), as row WIN_ROW (default loragen_<WINNER>).
  name=${WINNER:?set WINNER} row=${WIN_ROW:-loragen_$WINNER} qt="$WORK/q_test_$WINNER"
  $PY -c "from generator.base_model import ensure_base_model; print(ensure_base_model())"
  staged_checkpoint "$name"
  test_rows "$row" "$qt" "$CK/$name"
  gen "${row}_labels" "$qt" --generator "$CK/$name" --task-set test --rows "${row}_labels" --system-prompt --name-labels
  waitall
  for f in "$WORK"/eval_"$row"*.log; do echo "== $f"; tail -n 2 "$f"; done
  tar czf "$OUT/generations_$WINNER.tgz" -C "$WORK" "q_test_$WINNER" $(cd "$WORK" && ls eval_"$row"*.log)
  echo "winner_test_rows phase done at $((SECONDS - start)) s"
  ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
