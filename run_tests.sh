#!/usr/bin/env bash
# Sets up .venv when needed, then runs the default test suite (slow and GPU tests are opt-in:
# ./run_tests.sh -m slow). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
exec .venv/bin/python -m pytest "$@"
