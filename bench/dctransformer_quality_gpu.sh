#!/usr/bin/env bash
# The unconditional DCTransformer on one lent GPU, within one device call (bench/README.md "Run 8").
#
#   OUT=runs/dct_quality/gpu MINUTES=5.5 bash bench/dctransformer_quality_gpu.sh            # run 8 as measured
#   CONFIGS=a MINUTES=6 BATCH=1024 LR_A=2e-3 COUNTER=1 bash bench/dctransformer_quality_gpu.sh  # run 9 as measured,
#     and the next lent GPU's first command: run 9 again, now with the chunk loss weighted by the chunk count (fixed
#     Nov 27; runs 1-10 trained the biased loss), so the difference is the fix; then config B at the same batch
#     (CONFIGS=b ... LR_B=1.2e-3) if time is left
#   Carry (device tool): data_pipeline/codecs/_dct_kernel.abi3.so (the stable-ABI build of `make setup`, which
#   runs on the image's newer Python), runs/dct_quality/scene_counter_q75.pt (`bench/scene_counter.py --quality
#   75`, one minute here, so COUNTER=1 costs no GPU time) and .whl/ (boto3's wheels: `pip download boto3
#   --python-version 3.12 --only-binary=:all: -d .whl`). Weights live in the ignored runs/ folder: A starts from
#   scratch unless INIT_PARTS names weights carried into the call.
#
# 1. Solo speed run of config A for 25 s (every path of the bench on the GPU: flop count, training, bits, sampling,
#    analysis), so a broken path stops the call in a minute and the training speed / MFU is measured uncontended.
# 2. Config A (d=256, 4 layers) and, with CONFIGS="a b", B (d=384, 6 layers) side by side on the one GPU for
#    MINUTES each: 500,000 fresh scenes, bf16 autocast, chunk CHUNK (64), batch BATCH (256); scored at temperature 1 on 512
#    held-out scenes with 1,024 samples. INIT_PARTS: a folder of A's weights split by bench/weight_parts.py (carried
#    with the call), continued with a fresh schedule.
# 3. Rescored with nucleus sampling (top-p 0.9; and top-p 0.8 on channel and position with the values drawn at
#    temperature 1). Every scoring also runs the scene counter (bench/scene_counter.py) when its cached weights
#    (runs/dct_quality/scene_counter_q75.pt) are carried, or COUNTER=1 trains it here.
# $OUT receives all_logs.txt, the temperature-1 sample grids and A's weights as bf16 parts of <= 13 MB
# (bench/weight_parts.py join), within the device tool's 8 files. The image's python3 has torch but not boto3
# (imported by the data pipeline): wheels in .whl/ are installed first when present.
set -euo pipefail
OUT=${OUT:-runs/dct_quality/gpu}
MINUTES=${MINUTES:-5.5}
CONFIGS=${CONFIGS:-a b}
BATCH=${BATCH:-256}
INIT_PARTS=${INIT_PARTS:-}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu AMP=none TRAIN=3000 EVAL=64 SAMPLES=16 MINUTES=0.05: a dry run of the logic
TRAIN=${TRAIN:-500000}
EVAL=${EVAL:-512}
SAMPLES=${SAMPLES:-1024}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
# The codec's C kernel: the carried stable-ABI build, or built here.
python3 -c "from data_pipeline.codecs import _dct_kernel" >"$OUT/build.log" 2>&1 \
    || python3 setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    | tee -a "$OUT/device.txt"

BENCH="python3 bench/dctransformer_quality.py --models unconditional --quality 75 --device $DEVICE --amp ${AMP:-bf16}"
BENCH="$BENCH --peak-tflops 989 --chunk ${CHUNK:-64} --batch $BATCH"
if [ -f runs/dct_quality/scene_counter_q75.pt ] || [ "${COUNTER:-0}" = 1 ]; then
    BENCH="$BENCH --counter"
fi
declare -A SHAPE=([a]="--d-model 256 --layers 4 --heads 4" [b]="--d-model 384 --layers 6 --heads 6")
declare -A LR=([a]="${LR_A:-1e-3}" [b]="${LR_B:-6e-4}")
INIT_A=""
if [ -n "$INIT_PARTS" ]; then
    python3 bench/weight_parts.py join "$INIT_PARTS" runs/dct_quality/ginit_unconditional.pt
    INIT_A="--init ginit_"
fi

$BENCH ${SHAPE[a]} --workers 16 --train $((TRAIN < 20000 ? TRAIN : 20000)) --minutes 0.42 --lr 1e-3 --eval 64 \
    --samples 16 --tag gsolo_ >"$OUT/solo.log" 2>&1 || { tail -40 "$OUT/solo.log"; exit 1; }
tail -n 3 "$OUT/solo.log" | head -n 2

for c in $CONFIGS; do
    init=""; [ "$c" = a ] && init="$INIT_A"
    $BENCH ${SHAPE[$c]} $init --workers 8 --train "$TRAIN" --minutes "$MINUTES" --lr "${LR[$c]}" --eval "$EVAL" \
        --samples "$SAMPLES" --tag "g8${c}_" >"$OUT/g8$c.log" 2>&1 &
done
wait || true
for c in $CONFIGS; do
    grep -E "step|unconditional:" "$OUT/g8$c.log" | tail -n 4
    cp "runs/dct_quality/g8${c}_unconditional_samples_grid.png" "$OUT/g8${c}_t1_grid.png" || true
done
python3 bench/weight_parts.py split runs/dct_quality/g8a_unconditional.pt "$OUT" --bf16 || true

for c in $CONFIGS; do
    $BENCH ${SHAPE[$c]} --workers 8 --eval-only --eval "$EVAL" --samples "$SAMPLES" --sample-top-p 0.9 \
        --tag "g8${c}_" >"$OUT/g8${c}_p09.log" 2>&1 &
    $BENCH ${SHAPE[$c]} --workers 8 --eval-only --eval "$EVAL" --samples "$SAMPLES" --sample-top-p 0.8 \
        --sample-value-top-p 1.0 --tag "g8${c}_" >"$OUT/g8${c}_cp08.log" 2>&1 &
done
wait || true
tail -n 2 "$OUT"/g8*_p09.log "$OUT"/g8*_cp08.log | grep "unconditional:" || true
for f in device.txt build.log solo.log g8a.log g8b.log g8a_p09.log g8b_p09.log g8a_cp08.log g8b_cp08.log; do
    [ -f "$OUT/$f" ] && { echo "=== $f"; cat "$OUT/$f"; }
done >"$OUT/all_logs.txt" 2>&1 || true
rm -f "$OUT"/device.txt "$OUT"/*.log
