#!/usr/bin/env bash
# Set up (first run) and start the whole service on CPU: embedded Redis, API and one
# worker in one process, the shipped demo model, http://127.0.0.1:8000 (LDIT_PORT to change).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m service "$@"
