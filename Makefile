# The two commands of the README, plus helpers. Each target installs what it needs first.
VENV := .venv/bin

.PHONY: setup demo test test-fast lint bench

setup:
	@bash scripts/setup.sh

# The main job: write openclipart shards once (2,400 drawings at 64 px, 400 per shard; shard
# 00000 is held out), then pretrain the `local` M3AE recipe on them, launched on an embedded
# local Ray (one JAX host actor); it ends with the cross-modal gain on the held-out shard. Then
# ridge probes of the model and of its random init on 2,000 drawings it never saw (the first
# 4,000 of the probe's openclipart set less the 2,000 trained on), and a short report.
DEMO_SHARDS := data/openclipart-64
DEMO_PROBE := --data openclipart --limit 4000 --evaluator ridge --no-progress

demo: setup $(DEMO_SHARDS)/stats.json
	$(VENV)/m3ae launch --config configs/m3ae_pretrain.py:local --workdir runs/demo
	$(VENV)/m3ae probe --model runs/demo/model $(DEMO_PROBE) --out runs/demo/probe
	$(VENV)/m3ae probe --model runs/demo/model --random-init $(DEMO_PROBE) --out runs/demo/probe-random
	$(VENV)/python scripts/demo_report.py runs/demo

$(DEMO_SHARDS)/stats.json:
	$(VENV)/m3ae shards --source openclipart --size 64 --limit 2400 --samples-per-shard 400 \
		--shuffle-seed 0 --overwrite --out $(DEMO_SHARDS)

# Every distinct openclipart drawing (7,434) at 64 px, 19 shards of 400: the `cpu` recipe's data.
data/openclipart-64-all/stats.json:
	$(VENV)/m3ae shards --source openclipart --size 64 --samples-per-shard 400 \
		--shuffle-seed 0 --overwrite --out data/openclipart-64-all

# Lint, format check, the import contracts and the whole test suite (CPU, offline): the CI command.
test: setup lint
	$(VENV)/pytest -q --durations=30

# The fast subset, about 2 minutes on 2 cores: every test not marked slow, ray or multiprocess
# (the marker table is in tests/conftest.py). It covers every package; `make test` is the gate.
FAST := not slow and not ray and not multiprocess

test-fast: setup
	$(VENV)/pytest -q -m "$(FAST)"

# ruff, then the dependency rules of pyproject.toml ([tool.importlinter]: layers, no cycles).
lint: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/lint-imports --no-cache --no-logo

bench: setup
	$(VENV)/python benchmarks/model_step.py --out benchmarks/results/model_step.json
