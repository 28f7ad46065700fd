#!/usr/bin/env bash
# Shared by the run_*.sh launchers: finds the project's python, checks arguments, and starts
# SCRIPT on WORKER_NUM workers through msrun (or directly for one worker).
# Not meant to be called on its own.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# msrun starts `python` from PATH: put the project's venv first when there is one.
if [[ -z "${VIRTUAL_ENV:-}" && -x "$ROOT/.venv/bin/python" ]]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi
export ONEDNN_MAX_CPU_ISA="${ONEDNN_MAX_CPU_ISA:-AVX2}"

die() { echo "error: $*" >&2; exit 2; }

check_device() {
  case "$1" in CPU|GPU|Ascend) ;; *) die "DEVICE_TARGET must be CPU, GPU or Ascend, got '$1'";; esac
}

check_count() {  # name value
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

# launch SCRIPT DEVICE_TARGET WORKER_NUM [--key=value ...]
launch() {
  local script="$1" device="$2" workers="$3"; shift 3
  check_device "$device"
  check_count WORKER_NUM "$workers"
  command -v python >/dev/null || die "no python on PATH: run 'make venv' or activate your environment"
  local local_workers="${LOCAL_WORKER_NUM:-$workers}"
  check_count LOCAL_WORKER_NUM "$local_workers"
  local log_dir="${LOG_DIR:-$ROOT/output/msrun_log}"
  if [[ "$workers" == 1 && -z "${RANK_TABLE_FILE:-}" ]]; then
    exec python "$ROOT/$script" --device_target="$device" "$@"
  fi
  command -v msrun >/dev/null || die "msrun not found on PATH (it ships with mindspore)"
  mkdir -p "$log_dir"
  local extra=()
  if [[ -n "${RANK_TABLE_FILE:-}" ]]; then
    # Legacy Ascend path: a rank table (hccl json) lists the devices of every node.
    [[ -f "$RANK_TABLE_FILE" ]] || die "RANK_TABLE_FILE not found: $RANK_TABLE_FILE"
    extra+=(--rank_table_file="$RANK_TABLE_FILE")
  fi
  if [[ -n "${NODE_RANK:-}" ]]; then extra+=(--node_rank="$NODE_RANK"); fi
  echo "msrun: $workers workers ($local_workers on this node), logs in $log_dir"
  set +e
  msrun --worker_num="$workers" --local_worker_num="$local_workers" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-8118}" \
        --log_dir="$log_dir" --join=True --cluster_time_out="${CLUSTER_TIME_OUT:-600}" "${extra[@]}" \
        "$ROOT/$script" --device_target="$device" "$@"
  local rc=$?
  set -e
  if [[ $rc -ne 0 ]]; then
    local failed
    failed=$(grep -l -E "Traceback|error:|Error" "$log_dir"/worker_*.log 2>/dev/null | head -1 || true)
    echo "error: distributed run failed (exit $rc); see ${failed:-$log_dir/worker_*.log}" >&2
    exit "$rc"
  fi
}
