#!/usr/bin/env bash
# The GPU figures in one device call of about 7 minutes (issue 3's scoring tests and targets, and training
# and eval on a GPU). Here, once:  python bench/gpu_wheels.py   (the wheels the device image lacks, in .whl/)
# Then the device tool:  run  command "bash bench/gpu_check.sh"  carry [".whl"]  timeout_s 600
# Each benchmark has its own time limit, so one that hangs costs only its share; everything it prints
# lands in $OUT (at most 8 files come back). Environment overrides make a small dry run on a CPU:
#   DEVICE=cpu MODEL_B=clipsift-xs MODEL_L=clipsift-tiny SAMPLES=2048 L_SAMPLES=512 IMAGE=128 \
#   TRAIN_ARGS="--scale xs --steps 3 --batch 32 --variants recipe" EVAL=0 WHEELS=0 TESTS=0 NEAR_SIZE=0.1M \
#   OUT=/tmp/gpu-check bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
MODEL_B=${MODEL_B:-ViT-B-32}
MODEL_L=${MODEL_L:-ViT-L-14}
SAMPLES=${SAMPLES:-65536}    # ViT-B-32 pairs; 20,000 pairs/s is the target on one H100
L_SAMPLES=${L_SAMPLES:-16384}
IMAGE=${IMAGE:-384}          # px of the photo-like JPEGs (web images are a few hundred px)
TRAIN_ARGS=${TRAIN_ARGS:---scale small --steps 30}
EVAL=${EVAL:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false

if [ "${WHEELS:-1}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target /tmp/site . || exit 1
fi

{ nvidia-smi; nproc; free -g; python3 -c "import torch, torchvision, ray, open_clip, pyarrow; print(torch.__version__, torchvision.__version__, ray.__version__, open_clip.__version__, pyarrow.__version__)"; } \
  > "$OUT/machine.txt" 2>&1

bench() {  # name, seconds, script and arguments
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))"
  timeout -k 10 "$limit" python3 "$@" > "$OUT/$name.txt" 2>&1
  echo "exit $?" >> "$OUT/$name.txt"
  grep -v -e "WARNING" -e "INFO" -e "Warning" "$OUT/$name.txt" | tail -n 12
}

# correctness first: the scoring tests on the GPU (Ray gives the actors the GPU: side copy stream, nvJPEG, fp32 without TF32);
# -P: the checkout's clipsift/ folder must not hide the installed package
if [ "${TESTS:-1}" = 1 ]; then
  echo "== tests on the device ($(date +%T))"
  timeout -k 10 100 python3 -P -m pytest tests/pipeline/test_score.py tests/filters/test_dedup_device.py -q -p no:cacheprovider \
    -o addopts="" -x > "$OUT/tests_score.txt" 2>&1
  echo "exit $?" >> "$OUT/tests_score.txt"
  tail -n 4 "$OUT/tests_score.txt"
fi

POOL=/tmp/gpu-check-pool
common=(--device "$DEVICE" --image-size "$IMAGE" --shard-size 8192 --batch-size 1024 --pool "$POOL")
bench score_b_device 150 bench/score_throughput.py --model "$MODEL_B" --samples "$SAMPLES" --decode device --repeats 2 "${common[@]}"
bench score_b_cpu 120 bench/score_throughput.py --model "$MODEL_B" --samples "$SAMPLES" --decode cpu --repeats 1 "${common[@]}"
rm -rf "$POOL"
bench score_l_device 150 bench/score_throughput.py --model "$MODEL_L" --samples "$L_SAMPLES" --decode device --repeats 2 "${common[@]}" \
  --batch-size 512
# shellcheck disable=SC2086
bench train_steps 150 bench/train_throughput.py $TRAIN_ARGS
if [ "$EVAL" = 1 ]; then
  bench eval_time 80 bench/eval_time.py --skip-tiny --full-fraction 0.25
fi
# near dedup on the GPU (device: auto) and on the CPU cores (device: cpu): issue 20's 5x goal (4M rows, 32-d)
bench near_dedup 150 bench/scale.py --sizes "${NEAR_SIZE:-4M}" --dim 32 --tar-sizes "" \
  --cases clip_score,dedup_embedding,dedup_embedding_cpu --dir /tmp/gpu-check-scale
