"""Deprecated alias of `python -m training.demo`; kept for one release, then removed.

Prints a notice and runs `training.demo` with the same arguments. Importing it is an error:
the code lives in `training.demo`.
"""

import runpy
import sys

if __name__ != "__main__":
    raise ImportError("model.demo moved to training.demo; import it from there")
print("model.demo is deprecated and goes in the next release; use: python -m training.demo", file=sys.stderr)
runpy.run_module("training.demo", run_name="__main__", alter_sys=True)
