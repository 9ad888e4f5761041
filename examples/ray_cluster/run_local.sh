#!/usr/bin/env bash
# The Ray deployment of README.md (this folder), whole, on one machine -- a demo and a check:
#   * a Ray head node, and a second Ray node offering the custom resource `loragen_generator`
#     (on a real cluster: the GPU node that holds the generator);
#   * the generator actor, pinned to that node by the resource;
#   * two vLLM servers (`loragen-vllm serve --ray-address`), each with its own adapter store, as
#     if on two serving nodes.
# It asks both servers for the same new description at the same time, prints the actor's
# statistics (the adapter was generated once), and then stops everything it started: its own
# process groups, never `ray stop` (which stops every Ray process on the machine).
#
#   CKPT=path/to/generator/checkpoint examples/ray_cluster/run_local.sh
#   (CKPT defaults to $LORAGEN_GENERATOR, else the shipped checkpoint; KEEP=1 keeps it running
#   until Ctrl-C.) Needs ~8 GiB of memory; takes 2-5 minutes on a 2-core CPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CKPT=${CKPT:-${LORAGEN_GENERATOR:-}}
if [[ -z "$CKPT" ]]; then
  CKPT=$("$PY" -c 'from loragen_vllm.defaults import default_generator_checkpoint as d; print(d() or "")')
fi
[[ -n "$CKPT" ]] || { echo "set CKPT to a generator checkpoint folder" >&2; exit 2; }
WORK=$(mktemp -d /tmp/lgdemo-XXXXXX)  # short: Ray's unix sockets live under it
export RAY_USAGE_STATS_ENABLED=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# One auth mode for every process (unset, `ray start --head` turns token auth on whenever
# ~/.ray/auth_token exists, and drivers connecting by address are then refused).
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
LEADERS=()  # process-group leaders we started
bg() { local log=$1; shift; setsid "$@" >"$WORK/$log" 2>&1 & LEADERS+=($!); }
cleanup() {
  set +e
  echo "stopping (logs stay in $WORK)"
  for g in "${LEADERS[@]}"; do kill -INT "$g" 2>/dev/null; done  # vLLM: like Ctrl-C; ray start --block: stops its node
  for _ in $(seq 30); do
    alive=0; for g in "${LEADERS[@]}"; do kill -0 "$g" 2>/dev/null && alive=1; done
    ((alive)) || break; sleep 1
  done
  for g in "${LEADERS[@]}"; do kill -KILL -- "-$g" 2>/dev/null; done  # what is left of our groups
}
trap cleanup EXIT
wait_port() { for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 1; done; return 1; }
wait_health() { for _ in $(seq 600); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }

# Every Ray node on one machine needs its own ports (on a real cluster the defaults do).
node_ports() {
  echo --node-manager-port "$(free_port)" --object-manager-port "$(free_port)" \
    --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
    --metrics-export-port "$(free_port)" --runtime-env-agent-port "$(free_port)"
}
COMMON=(--node-ip-address 127.0.0.1 --num-cpus 2 --num-gpus 0 --object-store-memory 200000000
        --disable-usage-stats --block)

HEAD_PORT=$(free_port); HEAD=127.0.0.1:$HEAD_PORT
echo "== Ray head node at $HEAD"
# shellcheck disable=SC2046
bg ray-head.log "$PY" -m ray.scripts.scripts start --head --port "$HEAD_PORT" --include-dashboard=false \
  --ray-client-server-port "$(free_port)" --temp-dir "$WORK/head" --resources '{"loragen_head": 1}' \
  "${COMMON[@]}" $(node_ports)
wait_port "$HEAD_PORT"

echo "== generator node (resource loragen_generator)"
# shellcheck disable=SC2046
bg ray-gen.log "$PY" -m ray.scripts.scripts start --address "$HEAD" --temp-dir "$WORK/gen" \
  --resources '{"loragen_generator": 1}' "${COMMON[@]}" $(node_ports)

echo "== generator actor from $CKPT (waits until the node has joined)"
"$PY" -m loragen_vllm generator start --ray-address "$HEAD" --checkpoint "$CKPT" --num-gpus 0 \
  --resources '{"loragen_generator": 1}' >/dev/null

URLS=()
for i in 0 1; do
  port=$(free_port); URLS+=("http://127.0.0.1:$port")
  echo "== vLLM server $i on port $port (serve --ray-address $HEAD)"
  bg "server$i.log" "$PY" -m loragen_vllm serve --ray-address "$HEAD" --generator "$CKPT" \
    --store "$WORK/store$i" --host 127.0.0.1 --port "$port" -- --max-model-len 512
done
for u in "${URLS[@]}"; do wait_health "$u" || { tail -30 "$WORK"/server*.log; exit 1; }; done

DESC="Classify the sentiment of a product review, demo $(date +%s)."
echo "== the same new description on both servers at once: $DESC"
for u in "${URLS[@]}"; do
  curl -s "$u/v1/chat/completions" -H 'Content-Type: application/json' -d "{
    \"model\": \"$DESC\", \"max_tokens\": 8, \"temperature\": 0,
    \"messages\": [{\"role\": \"user\", \"content\": \"The battery died after two days.\"}]}" \
    -o "$WORK/reply-${u##*:}.json" -w "$u -> HTTP %{http_code}\n" &
done
wait $(jobs -p | tail -2)
for f in "$WORK"/reply-*.json; do "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print("  ", r.get("choices", [{}])[0].get("message", {}).get("content", r))' "$f"; done

echo "== actor statistics"
"$PY" -m loragen_vllm generator status --ray-address "$HEAD" | "$PY" -c "
import json, sys
h = json.load(sys.stdin); s = h['stats']
print('   node', h['node_id'][:12], 'pid', h['pid'], 'on', h['device'] + ':', s['calls'], 'calls,',
      s['generated'], 'adapters generated in', s['passes'], 'passes,', s['joined'], 'joined in flight,',
      s['cache_hits'], 'from the cache; passes by size:', s['batch_sizes'])"
if [[ "${KEEP:-0}" == 1 ]]; then
  echo "running: servers ${URLS[*]}, Ray at $HEAD; Ctrl-C stops everything"
  while sleep 3600; do :; done
fi
