"""python -m service [all|api|worker]

  all (default)  embedded Redis unless LDIT_REDIS_URL is set, the API and one worker
  api            the HTTP API alone (needs LDIT_REDIS_URL)
  worker         one worker alone (needs LDIT_REDIS_URL)

Every setting comes from LDIT_* environment variables (service/settings.py).
"""

from __future__ import annotations

import sys

from service.logs import setup_logging
from service.runtime import run_all, run_api, run_worker
from service.settings import Settings


def main(argv: list[str]) -> int:
    role = argv[0] if argv else "all"
    if role in ("-h", "--help"):
        print(__doc__)
        return 0
    runners = {"all": run_all, "api": run_api, "worker": run_worker}
    if role not in runners or len(argv) > 1:
        print(__doc__, file=sys.stderr)
        return 2
    settings = Settings()
    setup_logging(settings.log_level, settings.log_format)
    runners[role](settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
