#!/usr/bin/env bash
# Runs the whole test suite, slow end-to-end tests included (`pytest` alone skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/python -m pytest -m "slow or not slow" -p no:cacheprovider "$@"
