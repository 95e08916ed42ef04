#!/usr/bin/env bash
# DeRTa training on a Cloud TPU VM slice (v4-32, v5p-64, ...), one Python process per worker,
# joined by jax.distributed (auto-detected on TPU VMs).
#
#   launch/tpu_pod.sh [--dry-run] --name NAME --zone ZONE --accelerator-type v5p-64 \
#       [--version RUNTIME] [--project P] [--spot] ACTION [-- TRAIN ARGS]
#
# ACTION: create | setup | train | logs | stop | delete | up (= create, setup, train, logs)
#   create  creates the slice, or reuses it if it exists
#   setup   copies this checkout (git archive of HEAD) to every worker and installs it there
#   train   starts `python -m derta_jax.train TRAIN ARGS` on every worker (in the background)
#   logs    streams worker 0's log
#   stop    sends SIGTERM on every worker (training saves a final checkpoint, then exits)
#   delete  deletes the slice
# The workdir, model dir and data must be readable by every worker: give them as gs:// URLs
# (derta_jax reads and writes buckets itself, see launch/README.md). --dry-run prints every
# command instead of running it.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2; }

dry_run=0; name=""; zone=""; accel=""; version="v2-alpha-tpuv5"; project=""; spot=0; action=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator-type) accel="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *) action="$1"; shift ;;
  esac
done
train_args=("$@")
[ -n "$name" ] && [ -n "$zone" ] && [ -n "$action" ] || { echo "need --name, --zone and an ACTION" >&2; usage; }

run() {  # run a command, or print it (shell-quoted) with --dry-run
  if [ "$dry_run" -eq 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
gcloud_tpu=(gcloud compute tpus tpu-vm)
common=(--zone "$zone")
[ -n "$project" ] && common+=(--project "$project")
remote_dir="derta_jax"
log="${remote_dir}/train.log"

quoted_train_args=$(printf '%q ' "${train_args[@]+"${train_args[@]}"}")

create() {
  [ -n "$accel" ] || { echo "create needs --accelerator-type" >&2; exit 2; }
  if [ "$dry_run" -eq 0 ] && "${gcloud_tpu[@]}" describe "$name" "${common[@]}" >/dev/null 2>&1; then
    echo "reusing TPU VM ${name}"; return
  fi
  local extra=()
  [ "$spot" -eq 1 ] && extra+=(--spot)
  run "${gcloud_tpu[@]}" create "$name" "${common[@]}" --accelerator-type "$accel" \
    --version "$version" "${extra[@]+"${extra[@]}"}"
}
setup() {
  local tarball
  tarball="/tmp/derta_jax-$(git rev-parse --short HEAD).tar.gz"
  run git archive --format=tar.gz --prefix="${remote_dir}/" -o "$tarball" HEAD
  run "${gcloud_tpu[@]}" scp "$tarball" "${name}:derta_jax.tar.gz" "${common[@]}" --worker=all
  run "${gcloud_tpu[@]}" ssh "$name" "${common[@]}" --worker=all --command \
    "tar xzf derta_jax.tar.gz && cd ${remote_dir} && bash scripts/setup.sh && .venv/bin/pip install -q 'jax[tpu]==0.10.2'"
}
train() {
  run "${gcloud_tpu[@]}" ssh "$name" "${common[@]}" --worker=all --command \
    "cd ${remote_dir} && nohup .venv/bin/python -m derta_jax.train ${quoted_train_args} > train.log 2>&1 &"
}
logs() { run "${gcloud_tpu[@]}" ssh "$name" "${common[@]}" --worker=0 --command "tail -n +1 -F ${log}"; }
stop() { run "${gcloud_tpu[@]}" ssh "$name" "${common[@]}" --worker=all --command "pkill -TERM -f derta_jax.train || true"; }
delete() { run "${gcloud_tpu[@]}" delete "$name" "${common[@]}" --quiet; }

case "$action" in
  create) create ;;
  setup) setup ;;
  train) train ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  up) create; setup; train; logs ;;
  *) echo "unknown ACTION: $action" >&2; usage ;;
esac
