#!/usr/bin/env bash
# Set up (first run) and start the whole service on CPU: embedded Redis, API and one
# worker in one process, the shipped demo model, http://127.0.0.1:8000 (LDIT_PORT to change).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Readable log lines here (LDIT_LOG_FORMAT=json for one JSON object a line, as in containers); the
# service says when it starts loading the model and when it is ready, with its URL.
export LDIT_LOG_FORMAT="${LDIT_LOG_FORMAT:-text}"
exec .venv/bin/python -m service "$@"
