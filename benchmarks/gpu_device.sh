#!/usr/bin/env bash
# What needs a GPU, in one call on a lent GPU machine: CLIP on a GPU (issue 16, item 4: benchmarks/clip_gpu.py
# in the configurations worth a short lease, each stopped after 150 s) and the bundled trainer's
# throughput (stopped after 180 s); the results' JSON and the logs are written to $OUT (benchmarks/results
# elsewhere), and the log ends with a table of them.
#
# A lent machine is bare and offline: its python3 holds torch, torchvision, timm, numpy, pillow, pyarrow,
# scikit-image, tokenizers and nvidia-ml-py, not open_clip nor webdataset. Here, first: `make gpu-wheels`
# (those two and what they need beyond that image, as wheels in .wheels/, git-ignored); then the device
# tool's
#     run(command="bash benchmarks/gpu_device.sh", carry=[".wheels"], timeout_s=540)
# On a GPU box of your own, after `make setup`: `bash benchmarks/gpu_device.sh` (it uses .venv's python).
# Arguments are passed on to every configuration (the last of a repeated option wins): the test runs this
# script on the CPU with `--device cpu --model ViT-S-32-alt --images 16 ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then  # the project's venv where there is one (a GPU box of your own), else the machine's
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
EXTRA=("$@")
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
LOG="$DEST/gpu_device.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

if ! "$PY" -c "import open_clip, webdataset" 2>/dev/null; then
    if ! compgen -G ".wheels/*.whl" >/dev/null; then
        say "open_clip or webdataset is not installed for $PY and there is no .wheels/ to install them from:" \
            "run 'make gpu-wheels' where pip can reach PyPI, and carry .wheels"
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/clip-site \
        .wheels/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH=/tmp/clip-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
device=cuda  # the trainer's too; `--device cpu` among the arguments makes the whole script a smoke test
if [[ " ${EXTRA[*]} " == *" cpu "* ]]; then device=cpu; fi
if [ "$device" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "no CUDA device for $PY: this script measures a GPU (give '--device cpu' for a smoke test of it)"
    exit 2
fi
{
    echo "--- machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    echo "cpus: $(nproc)"
    "$PY" - <<'EOF'
import importlib.metadata as md
import sys
print("python", sys.version.split()[0])
for name in ("torch", "torchvision", "open_clip_torch", "timm", "numpy", "pillow", "pyarrow", "webdataset",
             "tokenizers", "nvidia-ml-py"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
} 2>&1 | tee -a "$LOG"

# name | arguments. The first is issue 16's target configuration in one process; the second the same stage
# as GPU_TASKS processes (default 4) sharing the GPU, as Spark runs it with spark.task.resource.gpu.amount =
# 1/GPU_TASKS (each its own GIL and a share of the cores: does one process's decode pool hold the GPU
# back?); the others show what moves it: bfloat16, half the decode threads (is the CPU the limit?), and a
# model four times heavier.
tasks=${GPU_TASKS:-4}
CONFIGS=(
    "b512|--model ViT-B-32 --batch 512 --images 16384"
    "tasks$tasks|--model ViT-B-32 --batch 512 --images 16384 --processes $tasks --threads $(( ($(nproc) + tasks - 1) / tasks ))"
    "bf16|--model ViT-B-32 --batch 512 --images 16384 --dtype bfloat16"
    "half-threads|--model ViT-B-32 --batch 512 --images 16384 --threads $(( ($(nproc) + 1) / 2 ))"
    "vit-l-14|--model ViT-L-14 --batch 256 --images 4096 --check 64"
)
failed=0
results=()
for config in "${CONFIGS[@]}"; do
    name=${config%%|*}
    results+=("$DEST/clip_gpu_$name.json")
    read -ra args <<<"${config#*|}"
    args+=("${EXTRA[@]}")
    say "--- $name: ${args[*]}"
    if ! timeout 150 "$PY" -m benchmarks.clip_gpu "${args[@]}" --out "${results[-1]}" 2>&1 | tee -a "$LOG"; then
        say "--- $name FAILED"
        failed=1
    fi
done
# The bundled trainer on the same machine: `python -m trainer` (its defaults: bf16 autocast, fused AdamW,
# pinned batches) on synthetic image_text shards, with as many loader workers as it has cores to spare.
# Its log lines give tokens/s and the share of time the step waited for data.
trainer_log="$DEST/trainer.log"
work=$(mktemp -d)
read -ra targs <<<"${TRAINER_ARGS:-}"
say "--- trainer: python -m trainer --device $device --steps 200 --workers $(( $(nproc) / 2 )) ${targs[*]}"
shards='import sys; from benchmarks.trainer_bench import synthetic_shards; synthetic_shards(sys.argv[1], n=512)'
if ! { "$PY" -c "$shards" "$work/shards" && timeout 180 "$PY" -m trainer --shards "$work/shards" --out "$work/run" \
        --device "$device" --steps 200 --log-every 50 --workers $(( $(nproc) / 2 )) "${targs[@]}"; } >"$trainer_log" 2>&1
then
    say "--- trainer FAILED (the end of $trainer_log:)"
    tail -20 "$trainer_log" | tee -a "$LOG"
    failed=1
fi
rm -rf "$work"
say "--- results (benchmarks/clip_gpu.py: stage, its two ceilings, the GPU's busy share, agreement, targets)"
"$PY" -c 'import sys; from benchmarks.clip_gpu import table; print(table(sys.argv[1:]))' \
    "${results[@]}" 2>&1 | tee -a "$LOG"
grep -E "step [0-9]+/|finished" "$trainer_log" | sed 's/^.*INFO trainer: /trainer: /' | tee -a "$LOG" || true
exit $failed
