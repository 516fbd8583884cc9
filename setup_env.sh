#!/usr/bin/env bash
# Creates or refreshes the project's virtual environment in .venv (sourced by run_pipeline.sh
# and run_tests.sh). Idempotent: it reinstalls only when setup.py or the tested pins in
# requirements/constraints.txt changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$root/.venv/bin/python" ]; then
  echo "setup: creating $root/.venv with $python_bin" >&2
  "$python_bin" -m venv "$root/.venv"
fi
stamp="$root/.venv/.headstart-installed"
constraints="$root/requirements/constraints.txt"
want="$(cat "$root/setup.py" "$constraints" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing headstart and its pinned dependencies (a few minutes the first time)" >&2
  "$root/.venv/bin/python" -m pip install --quiet --upgrade pip
  "$root/.venv/bin/python" -m pip install --quiet --constraint "$constraints" -e "$root[test]"
  echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
