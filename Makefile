# The two commands of the README, plus helpers. Each target installs what it needs first.
VENV := .venv/bin

.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

# The main job: pretrain the `local` M3AE recipe on real openclipart pictures and captions.
demo: setup
	$(VENV)/m3ae train --config configs/m3ae_pretrain.py:local --workdir runs/demo

# Lint, format check and the whole test suite (CPU, offline).
test: setup lint
	$(VENV)/pytest -q

lint: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

bench: setup
	$(VENV)/python benchmarks/model_step.py --out benchmarks/results/model_step.json
