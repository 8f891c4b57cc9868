#!/usr/bin/env bash
# One idempotent setup step for a fresh machine (run by `make setup`, and so by
# `make demo` and `make test`):
#   1. a Python virtualenv with the pinned torch wheel, cached outside the clone
#      under ~/.cache/cohort/ (the wheel brings libtorch, and NCCL through
#      nvidia-nccl-cu13), linked into the clone as .venv;
#   2. the link libnccl.so -> libnccl.so.2 that cudarc's run-time loader needs;
#   3. .cargo/config.toml pointing the build at that libtorch, with an rpath so
#      target/*/cohort* run without LD_LIBRARY_PATH.
# A second run only checks what is there and takes a second or two.
set -euo pipefail

# The one place the torch version is pinned. tch 0.24 builds against 2.11.0.
TORCH_VERSION=2.11.0
PY_PACKAGES=("torch==${TORCH_VERSION}" "numpy" "safetensors")

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${COHORT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort}"
venv="$cache/venv-torch-${TORCH_VERSION}"
python="${PYTHON:-python3}"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

command -v "$python" >/dev/null || die "python3 not found; install Python 3.9+ with the venv module"
command -v cargo >/dev/null || die "cargo not found; install a Rust toolchain (rustup)"

mkdir -p "$cache"
# The venv is complete only once the marker is written: an interrupted install
# is redone instead of being taken for a good one.
if [[ ! -f "$venv/.cohort-complete" ]]; then
    say "creating $venv (torch ${TORCH_VERSION}; a few GB, once per machine)"
    rm -rf "$venv"
    "$python" -m venv "$venv" || die "could not create a virtualenv at $venv (Debian: apt-get install python3-venv)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off "${PY_PACKAGES[@]}" \
        || die "pip could not install ${PY_PACKAGES[*]} into $venv"
    touch "$venv/.cohort-complete"
fi

# .venv in the clone is a link to the cached venv (git-ignored).
if [[ "$(readlink "$root/.venv" 2>/dev/null || true)" != "$venv" ]]; then
    [[ -e "$root/.venv" && ! -L "$root/.venv" ]] && die "$root/.venv exists and is not a link made by setup; move it away"
    ln -sfn "$venv" "$root/.venv"
fi

site="$(echo "$venv"/lib/python3*/site-packages)"
torch_dir="$site/torch"
[[ -f "$torch_dir/lib/libtorch_cpu.so" ]] || die "$torch_dir/lib/libtorch_cpu.so missing; delete $venv and run make setup again"
installed="$(sed -n "s/^__version__ = '\([^'+]*\).*/\1/p" "$torch_dir/version.py")"
[[ "$installed" == "$TORCH_VERSION" ]] || die "$venv holds torch $installed, expected $TORCH_VERSION; delete it and run make setup again"

nccl_dir="$site/nvidia/nccl/lib"
if [[ -f "$nccl_dir/libnccl.so.2" ]]; then
    [[ -e "$nccl_dir/libnccl.so" ]] || ln -sfn libnccl.so.2 "$nccl_dir/libnccl.so"
else
    say "warning: no libnccl.so.2 under $nccl_dir; the nccl backend will be unavailable"
fi

mkdir -p "$root/.cargo"
config="$root/.cargo/config.toml"
want="$(cat <<CONF
# Written by scripts/setup.sh (make setup); git-ignored. Do not edit by hand.
[env]
LIBTORCH = "$torch_dir"
COHORT_TORCH_VERSION = "$TORCH_VERSION"

[build]
rustflags = ["-C", "link-arg=-Wl,-rpath,$torch_dir/lib:$nccl_dir"]
# rustdoc builds doc tests with its own flags.
rustdocflags = ["-C", "link-arg=-Wl,-rpath,$torch_dir/lib:$nccl_dir"]
CONF
)"
if [[ "$(cat "$config" 2>/dev/null || true)" != "$want" ]]; then
    printf '%s\n' "$want" > "$config"
    say "wrote .cargo/config.toml (LIBTORCH=$torch_dir)"
fi
say "ok: torch $TORCH_VERSION in $venv"
