#!/usr/bin/env bash
# What the OpenMPI rows of bench/collectives_vs_peers.py need, and nothing
# `make test` needs: OpenMPI from Debian (openmpi-bin, libopenmpi-dev) and
# mpi4py in the project's virtualenv (.venv, made by `make setup`).
# Idempotent: when both are there it only checks, in a second.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
say() { printf 'setup_mpi: %s\n' "$*"; }
die() { printf 'setup_mpi: error: %s\n' "$*" >&2; exit 1; }

[[ -x "$python" ]] || die "$python not found: run make setup first"

if ! command -v mpirun >/dev/null || ! dpkg -s libopenmpi-dev >/dev/null 2>&1; then
    [[ "$(id -u)" == 0 ]] || die "installing OpenMPI needs root: sudo $0"
    say "installing openmpi-bin and libopenmpi-dev (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
fi
if ! "$python" -c "import mpi4py" 2>/dev/null; then
    say "installing mpi4py into $(readlink -f "$root/.venv") (builds against OpenMPI, a minute or two)"
    "$python" -m pip install --quiet --disable-pip-version-check mpi4py
fi
say "ok: $(mpirun --version 2>/dev/null | head -1), mpi4py $("$python" -c 'import mpi4py; print(mpi4py.__version__)')"
