#!/usr/bin/env bash
# Usage: bash scripts/run_distribute_train.sh DEVICE_TARGET WORKER_NUM [--key=value ...]
# Data-parallel training on WORKER_NUM workers via msrun (HCCL on Ascend, NCCL on GPU, MCCL on CPU).
# Environment: LOCAL_WORKER_NUM (workers on this node, default WORKER_NUM), NODE_RANK (multi-node),
#   MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 8118), LOG_DIR (default output/msrun_log),
#   RANK_TABLE_FILE (legacy Ascend rank table).
source "$(dirname "$0")/_launch.sh"
[[ $# -ge 2 ]] || die "usage: bash scripts/run_distribute_train.sh DEVICE_TARGET WORKER_NUM [--key=value ...]"
device="$1"; workers="$2"; shift 2
launch train.py "$device" "$workers" "$@"
