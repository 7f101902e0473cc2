#!/usr/bin/env bash
# The GPU benchmark in one command, on a machine with an NVIDIA GPU (never needed by the tests):
#   bash benchmarks/gpu.sh [OUT.json]          default OUT: benchmarks/results/gpu.json
#   WHEELS=/path/to/wheelhouse bash benchmarks/gpu.sh   (an offline machine: pip --find-links)
#
# Makes its own venv (benchmarks/.data/gpu-venv) with the project and jax[cuda12] at this
# checkout's JAX version, records nvidia-smi, then runs benchmarks/gpu.py (the bf16 matmul peak,
# the base and large train steps in bfloat16 with cuDNN attention at the largest batch that fits,
# the encoder's forward rate) within what is left of 8 minutes, and writes one JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu.json}
VENV=benchmarks/.data/gpu-venv
LIMIT_S=${LIMIT_S:-480}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi: this needs an NVIDIA GPU" >&2; exit 2; }
py=""
for cand in python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    py=$cand; break
  fi
done
[ -n "$py" ] || { echo "gpu.sh: need Python >= 3.11" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"

# The JAX of this checkout's .venv if there is one, else the newest.
jax_version=$(.venv/bin/python -c 'import jax; print(jax.__version__)' 2>/dev/null || true)
jax_spec="jax[cuda12]${jax_version:+==$jax_version}"
pip_args=(-q --disable-pip-version-check)
[ -n "${WHEELS:-}" ] && pip_args+=(--find-links "$WHEELS")
echo "gpu.sh: installing the project and $jax_spec into $VENV ($(elapsed) s)"
"$VENV/bin/python" -m pip install "${pip_args[@]}" -e . "$jax_spec"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
  > "$VENV/nvidia-smi.txt"
echo "gpu.sh: $(cat "$VENV/nvidia-smi.txt") ($(elapsed) s)"
left=$(( LIMIT_S - $(elapsed) - 15 ))
[ "$left" -gt 60 ] || { echo "gpu.sh: only ${left} s left after the install" >&2; exit 1; }
timeout "$left" "$VENV/bin/python" benchmarks/gpu.py --out "$OUT" --budget-s $(( left - 30 ))
"$VENV/bin/python" - "$OUT" "$VENV/nvidia-smi.txt" <<'PY'
import json, sys
out, smi = sys.argv[1], sys.argv[2]
result = json.load(open(out))
result["nvidia_smi"] = open(smi).read().strip()
json.dump(result, open(out, "w"), indent=2)
PY
echo "gpu.sh: done in $(elapsed) s -> $OUT"
