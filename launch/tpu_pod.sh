#!/usr/bin/env bash
# Runs launch/train.py on every worker of a Cloud TPU VM pod, one process per
# worker. Each process joins the others with jax.distributed.initialize()
# (sdar_jax.distributed detects the TPU VM and reads the pod's worker list
# from the TPU metadata), and all of them build one global mesh.
#
# Usage:
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh [--dry-run] [train.py args...]
#   e.g. launch/tpu_pod.sh --config=configs/sdar_1p7b.py --config.mesh.fsdp=-1 --config.mesh.data=1
#
# Environment:
#   TPU_NAME   (required) the TPU VM / pod name.
#   ZONE       (required) its zone.
#   PROJECT    GCP project (default: gcloud's configured project).
#   REPO_DIR   the sdar_jax checkout on every worker (default: sdar_jax, relative to $HOME).
#   PYTHON     the interpreter on the workers, relative to REPO_DIR or absolute
#              (default: .venv/bin/python).
#   WORKER     which workers to run on (default: all).
#   EXTRA_ENV  extra "NAME=value ..." assignments for the workers, e.g.
#              "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true".
#   DRY_RUN=1  the same as --dry-run: print the command instead of running it.
set -euo pipefail

dry_run="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi

: "${TPU_NAME:?set TPU_NAME to the TPU pod name}"
: "${ZONE:?set ZONE to the TPU pod zone}"
repo_dir="${REPO_DIR:-sdar_jax}"
python="${PYTHON:-.venv/bin/python}"
worker="${WORKER:-all}"

# The command each worker runs; train.py's arguments are quoted so that they
# reach it unchanged through the remote shell.
printf -v remote 'cd %q && env JAX_PLATFORMS=tpu %s%q launch/train.py' \
  "${repo_dir}" "${EXTRA_ENV:+${EXTRA_ENV} }" "${python}"
if (($#)); then
  printf -v args ' %q' "$@"
  remote+="${args}"
fi

cmd=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "--zone=${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  cmd+=("--project=${PROJECT}")
fi
cmd+=("--worker=${worker}" "--command=${remote}")

if [[ "${dry_run}" == "1" ]]; then
  printf -v line '%q ' "${cmd[@]}"
  printf '%s\n' "${line% }"
  exit 0
fi
exec "${cmd[@]}"
