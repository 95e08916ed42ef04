#!/usr/bin/env bash
# Runs N training processes on this machine, each with D fake CPU devices, joined through
# jax.distributed on 127.0.0.1: the multi-host path of a TPU pod or GPU cluster, on one box.
#
#   launch/local_multiprocess.sh --num-processes 2 --devices-per-process 4 -- \
#       --config=configs/tiny.py --workdir /tmp/run
#
# Process 0's output goes to the terminal; process i>0 writes <log dir>/process_<i>.log
# (--log-dir, default: a temporary folder, printed). Exits non-zero if any process fails.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2; }

num_processes=2
devices=4
port=""
log_dir=""
python_bin="${PYTHON:-python}"
while [ $# -gt 0 ]; do
  case "$1" in
    --num-processes) num_processes="$2"; shift 2 ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "unknown option: $1 (train arguments go after --)" >&2; usage ;;
  esac
done
[ "$num_processes" -ge 1 ] 2>/dev/null || { echo "--num-processes must be >= 1" >&2; exit 2; }
[ "$devices" -ge 1 ] 2>/dev/null || { echo "--devices-per-process must be >= 1" >&2; exit 2; }
if [ -z "$port" ]; then
  port=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[ -n "$log_dir" ] || log_dir=$(mktemp -d)
mkdir -p "$log_dir"

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${devices}"
pids=()
# shellcheck disable=SC2329  # invoked by the trap
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = num_processes - 1; i >= 0; i--)); do
  cmd=("$python_bin" -m derta_jax.train "$@" --coordinator "127.0.0.1:${port}"
       --num_processes "$num_processes" --process_id "$i")
  if [ "$i" -eq 0 ]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"${log_dir}/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done
echo "local_multiprocess: ${num_processes} processes x ${devices} devices, coordinator 127.0.0.1:${port}, logs in ${log_dir}" >&2

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
if [ "$status" -ne 0 ]; then
  echo "local_multiprocess: a process failed (exit ${status}); see ${log_dir}" >&2
fi
exit "$status"
