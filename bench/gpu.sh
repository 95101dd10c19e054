#!/usr/bin/env bash
# Everything this project measures on a GPU, in one call of at most 8 minutes on an H100/H200:
#
#     bash bench/gpu.sh [FOLDER]        # default: gpu-results/<UTC time>; PYTHON=... to choose the interpreter
#
# 1. the GPU tests (`pytest -m gpu`: every edit, prefill and decode, bf16, 4k-32k, against the fp32 reference);
# 2. bench/attention.py at 4k, 16k and 32k: our kernels against SDPA-flash, FlexAttention and the eager way;
# 3. bench/generate_long.py: a 16k-token prompt and 64 new tokens under ACT and ZeroTuning;
# 4. bench/overhead.py on random weights in Llama-3-8B's shape: prefill and generate under each method.
# Each step has its own time limit, so one that hangs cannot take the others' time. FOLDER gets the GPU's name,
# each step's output, attention.csv, and summary.md, every table in one file; the script prints summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results/$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python=${PYTHON:-python}
if ! "$python" -c "import intervene" 2>/dev/null; then  # a checkout that is not installed: the repo is the package
    mkdir -p /tmp/intervene-path && ln -sfn "$PWD" /tmp/intervene-path/intervene
    export PYTHONPATH=/tmp/intervene-path${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its output, note how it ended
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    timeout "$limit" "$@" >"$out/$name.md" 2>"$out/$name.log"
    local status=$?
    local ended="exit $status"
    [ $status -eq 124 ] && ended="stopped at its limit of $limit s"
    echo "$name: $ended after $((SECONDS - began)) s" >>"$out/steps.txt"
    if [ $status -ne 0 ]; then  # what went wrong, in the summary too
        printf '\n```\n%s\n```\n' "$(tail -n 20 "$out/$name.log")" >>"$out/$name.md"
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.csv" 2>&1
"$python" -c "import torch, triton, transformers; print(f'torch {torch.__version__}, triton {triton.__version__}, \
transformers {transformers.__version__}')" >"$out/versions.txt" 2>&1
step tests 150 "$python" -m pytest -m gpu -q -p no:cacheprovider tests/
step attention 150 "$python" bench/attention.py --lengths 4096,16384,32768 --csv "$out/attention.csv"
step generate_long 60 "$python" bench/generate_long.py --prompt 16384 --new-tokens 64
step overhead 90 "$python" bench/overhead.py --random llama-3-8b --device cuda --prompt-tokens 1024 --repeats 3

{
    echo "# intervene on $(head -n 1 "$out/gpu.csv")"
    echo
    echo "$(cat "$out/versions.txt"); $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    sed 's/^/- /' "$out/steps.txt"
    for name in tests attention generate_long overhead; do
        echo
        echo "## $name"
        echo
        cat "$out/$name.md"
    done
} >"$out/summary.md"
cat "$out/summary.md"
