#!/usr/bin/env bash
# Every model family end to end through the `fastntk` CLI at CPU scale, on the
# CIFAR-10 JPEG archive (../shared/data/cifar10-jpeg.zip):
#   [pretrain a small backbone] -> PEFT fine-tune on D -> Retrain on D_r
#   -> Fast-NTK unlearning of class 0.
# Usage: examples/cli_small_scale.sh MODEL OUTDIR   (MODEL: resnet20 | mobilenetv2 | vit_tiny_4)
# Scales (images per class, epochs) are set for a 2-core CPU; they show the
# pipeline works, not the paper's accuracies (those need `pretrain` on a GPU).
set -euo pipefail
MODEL=${1:?model}; OUT=${2:?outdir}
FASTNTK=${FASTNTK:-fastntk}
mkdir -p "$OUT"
WEIGHTS=()
case "$MODEL" in
  resnet20) IPC=50; TEST_IPC=50; EPOCHS=30; BS=100 ;;  # shipped CIFAR-10 weights
  mobilenetv2|vit_tiny_4)
    IPC=10; TEST_IPC=20; EPOCHS=15; BS=10
    # Images ranked >= 500 in each class pre-train; the first 500 are held out,
    # so the fine-tuning set (first IPC per class) was never seen in pre-training.
    # Two short epochs on 50 images a class: a CPU-sized stand-in for the GPU run.
    LR=(); [ "$MODEL" = mobilenetv2 ] && LR=(--lr 0.05)
    $FASTNTK pretrain --model "$MODEL" --data cifar10-jpeg --max-ipc 50 \
      --epochs 2 --batch-size 25 "${LR[@]}" --test-ipc "$TEST_IPC" --eval-every 1 \
      --out "$OUT/$MODEL-backbone.ckpt" --resume --json "$OUT/$MODEL-pretrain.json"
    WEIGHTS=(--weights "$OUT/$MODEL-backbone.ckpt") ;;
  *) echo "unknown model $MODEL" >&2; exit 2 ;;
esac
COMMON=(--model "$MODEL" "${WEIGHTS[@]}" --data cifar10-jpeg --ipc "$IPC"
        --test-ipc "$TEST_IPC" --epochs "$EPOCHS" --batch-size "$BS")
$FASTNTK train "${COMMON[@]}" --out "$OUT/$MODEL-full.ckpt" --json "$OUT/$MODEL-train.json"
$FASTNTK train "${COMMON[@]}" --exclude class:0 --out "$OUT/$MODEL-retrain.ckpt" \
  --json "$OUT/$MODEL-retrain.json"
$FASTNTK unlearn --checkpoint "$OUT/$MODEL-full.ckpt" --forget class:0 \
  --out "$OUT/$MODEL-unlearned.ckpt" --json "$OUT/$MODEL-unlearn.json"
$FASTNTK evaluate --checkpoint "$OUT/$MODEL-retrain.ckpt" --data cifar10-jpeg \
  --split train --ipc "$IPC" --json "$OUT/$MODEL-retrain-eval-train.json"
