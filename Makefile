# The README's two commands are `make demo` and `make test`; each runs `make setup`.
SHELL := /bin/bash
CARGO ?= cargo
COHORT := target/release/cohort

.PHONY: setup build demo test fmt lint bench-collectives gpu-bundle gpu-check clean

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --release --bins

# The main job: what this host offers, then the quickstart (2 workers train a small GPT).
demo: build
	$(COHORT) doctor
	$(COHORT) launch configs/quickstart.toml

# Formatting, lints, then every test of the workspace (scripts/test-deps.sh
# installs what the Slurm test needs, as root, when missing).
test: setup
	@bash scripts/test-deps.sh
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

# cohort (TCP and shared memory) side by side with OpenMPI (tcp, vader) and Gloo;
# bench/setup_mpi.sh installs OpenMPI and mpi4py (not needed by make test).
bench-collectives: build
	bash bench/setup_mpi.sh
	.venv/bin/python bench/collectives_vs_peers.py

# The GPU path's checks (scripts/gpu_check.sh) need an NVIDIA GPU. For a GPU
# machine without Rust, gpu-bundle leaves stripped binaries in target/gpu/
# to copy there (about 13 MB); gpu-check runs the checks here.
gpu-bundle: build
	mkdir -p target/gpu
	strip -o target/gpu/cohort $(COHORT)
	strip -o target/gpu/cohort-worker target/release/cohort-worker

gpu-check: build
	bash scripts/gpu_check.sh

# The coordinator under simulated load: 16,384 and 131,072 ranks (8 per node agent).
.PHONY: bench-coordinator
bench-coordinator: setup
	$(CARGO) run --release -p cohort-launcher --example coordinator_scale -- --nodes 2048 --nproc 8 --json target/coordinator_scale_16k.json
	$(CARGO) run --release -p cohort-launcher --example coordinator_scale -- --nodes 16384 --nproc 8 --json target/coordinator_scale_131k.json

clean:
	$(CARGO) clean
