#!/usr/bin/env bash
# The one-shot GPU check (issue 23). Every stage runs in its own process under its own
# timeout and writes OUT/<stage>.json as it ends (a stage that times out or crashes gets a
# record written here); OUT/summary.json lists them all. Nothing is installed from the
# network: LEMA itself with --no-deps --no-index, bitsandbytes from wheels in
# benchmarks/wheels/ when it is not importable (else the nf4 stage records "skipped").
#
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--out DIR] [--only STAGE[,STAGE...]]
#
# --device cpu runs every stage on a tiny model in about a minute (CI runs it: .ci/run).
# Exit status: 0 when every stage is ok or skipped, 1 when one failed or timed out, 2 on a
# missing dependency or a bad option.
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda
out="${OUT:-gpu-check-out}"
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "Error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$device" in cuda|cpu) ;; *) echo "Error: --device $device: use cuda or cpu" >&2; exit 2 ;; esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
python=${PYTHON:-python3}

# -- dependencies, checked first (never installed from the network) ------------------------------
missing=""
for module in torch transformers peft safetensors attrs click pytest; do
    "$python" -c "import $module" 2>/dev/null || missing="$missing $module"
done
if [ -n "$missing" ]; then
    echo "Error: missing Python packages:$missing (this check installs nothing from the network)" >&2
    exit 2
fi
if ! "$python" -c "import lema" 2>/dev/null; then
    "$python" -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1 \
        || { echo "Error: could not install LEMA offline (pip install --no-deps -e .)" >&2; exit 2; }
fi
if ! "$python" -c "import bitsandbytes" 2>/dev/null; then
    wheels=$(ls benchmarks/wheels/bitsandbytes-*.whl 2>/dev/null | head -1)
    if [ -n "$wheels" ]; then
        "$python" -m pip install -q --no-deps --no-index "$wheels" >/dev/null 2>&1 \
            || echo "note: could not install $wheels; the nf4 stage will be skipped" >&2
    fi
fi
if [ "$device" = cuda ] && ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "Error: --device cuda but torch sees no GPU (use --device cpu for the CPU run)" >&2
    exit 2
fi

# -- the stages, each under its own timeout (seconds: GPU, CPU) ----------------------------------
stages="env:60:60 pytest_cuda:150:120 parity:150:120 link:60:60 stream7b:180:120 nf4:180:120 auto_vs_peft:150:120 long32k:150:120"
# The tiny CPU run: one intra-op thread (a 2-core CI machine shared with other jobs spins
# its threads otherwise); the GPU run leaves the threads to torch.
[ "$device" = cpu ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0
summary="["
for entry in $stages; do
    IFS=: read -r name gpu_limit cpu_limit <<<"$entry"
    if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then continue; fi
    limit=$gpu_limit
    [ "$device" = cpu ] && limit=$cpu_limit
    echo "=== $name (timeout ${limit}s) ==="
    started=$(date +%s)
    timeout --kill-after=10 "$limit" "$python" -m benchmarks.gpu_check.stages "$name" --device "$device" --out "$out"
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        printf '{"stage": "%s", "device": "%s", "status": "failed", "error": "timed out after %s s", "seconds": %s}\n' \
            "$name" "$device" "$limit" "$(( $(date +%s) - started ))" >"$out/$name.json"
    elif [ $rc -ne 0 ] && [ ! -s "$out/$name.json" ]; then
        printf '{"stage": "%s", "device": "%s", "status": "failed", "error": "exited %s without a record", "seconds": %s}\n' \
            "$name" "$device" "$rc" "$(( $(date +%s) - started ))" >"$out/$name.json"
    fi
    [ $rc -ne 0 ] && status=1
    summary="$summary\"$name.json\","
done
printf '{"device": "%s", "stages": %s], "ok": %s}\n' "$device" "${summary%,}" \
    "$([ $status -eq 0 ] && echo true || echo false)" >"$out/summary.json"
echo "wrote $out/summary.json (status $status)"
exit $status
