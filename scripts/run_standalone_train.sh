#!/usr/bin/env bash
# Usage: bash scripts/run_standalone_train.sh DEVICE_TARGET [--key=value ...]
#   e.g. bash scripts/run_standalone_train.sh CPU --config_path=configs/demo.yaml --data_path=data/digits
source "$(dirname "$0")/_launch.sh"
[[ $# -ge 1 ]] || die "usage: bash scripts/run_standalone_train.sh DEVICE_TARGET [--key=value ...]"
device="$1"; shift
launch train.py "$device" 1 "$@"
