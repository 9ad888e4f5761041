#!/usr/bin/env bash
# Chat completions from a loragen-vllm server with curl; the `model` field is a task description.
#   loragen-vllm serve --generator CKPT      # in another terminal
#   bash examples/curl.sh [BASE_URL]
set -euo pipefail
BASE_URL="${1:-http://127.0.0.1:8000}"

echo "== models (the base model; resolved descriptions too only with serve --list-descriptions)"
curl -sS "$BASE_URL/v1/models"
echo

echo "== one completion, keyed by a description"
curl -sS "$BASE_URL/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "Classify the sentiment of a movie review as positive or negative.",
  "messages": [{"role": "user", "content": "A wonderful, moving film."}],
  "max_tokens": 16, "temperature": 0
}'
echo

echo "== streamed (server-sent events)"
curl -sS -N "$BASE_URL/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "Translate the English sentence into French.",
  "messages": [{"role": "user", "content": "The weather is lovely today."}],
  "max_tokens": 24, "temperature": 0, "stream": true
}'
echo

echo "== an invalid description is a 400 that names the problem"
curl -sS "$BASE_URL/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "   ",
  "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4
}'
echo
