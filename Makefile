# The README's two commands are `make demo` and `make test`; each runs `make setup`.
SHELL := /bin/bash
CARGO ?= cargo
COHORT := target/release/cohort

.PHONY: setup build demo test fmt lint bench-collectives clean

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --release --bins

# The main job: what this host offers, then a real tch training.
demo: build
	$(COHORT) doctor
	target/release/cohort-worker demo-mlp

# Formatting, lints, then every test of the workspace.
test: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

bench-collectives: build
	.venv/bin/python bench/collectives_vs_gloo.py

clean:
	$(CARGO) clean
