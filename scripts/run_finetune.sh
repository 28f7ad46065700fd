#!/usr/bin/env bash
# Usage: bash scripts/run_finetune.sh DEVICE_TARGET WORKER_NUM PRETRAINED_CKPT [--key=value ...]
# WORKER_NUM 1 runs standalone; more uses msrun as run_distribute_train.sh (same environment).
source "$(dirname "$0")/_launch.sh"
[[ $# -ge 3 ]] || die "usage: bash scripts/run_finetune.sh DEVICE_TARGET WORKER_NUM PRETRAINED_CKPT [--key=value ...]"
device="$1"; workers="$2"; ckpt="$3"; shift 3
[[ -f "$ckpt" ]] || die "pretrained checkpoint not found: $ckpt"
launch finetune.py "$device" "$workers" --pretrained="$ckpt" "$@"
