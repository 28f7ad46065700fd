#!/usr/bin/env bash
# Usage: bash scripts/run_eval.sh DEVICE_TARGET CHECKPOINT [--key=value ...]
source "$(dirname "$0")/_launch.sh"
[[ $# -ge 2 ]] || die "usage: bash scripts/run_eval.sh DEVICE_TARGET CHECKPOINT [--key=value ...]"
device="$1"; ckpt="$2"; shift 2
[[ -f "$ckpt" ]] || die "checkpoint not found: $ckpt"
launch eval.py "$device" 1 --checkpoint_path="$ckpt" "$@"
