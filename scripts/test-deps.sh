#!/usr/bin/env bash
# What the tests need from the system beyond scripts/setup.sh, installed when
# missing (run by `make test`; idempotent: a second run only checks).
#   - Slurm (slurmctld, slurmd, sbatch/srun) and munge, Debian's packages, for
#     the test that runs a job on a Slurm cluster made of network namespaces
#     (tests/slurm.rs). Nothing is started or enabled here: the test starts
#     its own daemons with its own configuration and stops them.
# Installing needs root and apt; elsewhere this says what is missing and the
# tests that need it skip (as root they fail, naming this script).
set -euo pipefail

say() { printf 'test-deps: %s\n' "$*"; }

missing=()
for tool in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
((${#missing[@]} == 0)) && exit 0

if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    say "not installing ${missing[*]} (needs root and apt-get); the Slurm test will skip"
    exit 0
fi
say "installing ${missing[*]} (Debian packages, once per machine)"
export DEBIAN_FRONTEND=noninteractive
# Package lists may be missing or stale on a fresh machine; the install
# below is retried after an update.
install() { apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
if ! install 2>/dev/null; then
    apt-get update -q >/dev/null
    install
fi
say "ok: $(slurmd -V)"
