"""Deprecated alias of `python -m training.train`; kept for one release, then removed.

Prints a notice and runs `training.train` with the same arguments. Importing it is an error:
the code lives in `training.train`.
"""

import runpy
import sys

if __name__ != "__main__":
    raise ImportError("model.train moved to training.train; import it from there")
print("model.train is deprecated and goes in the next release; use: python -m training.train", file=sys.stderr)
runpy.run_module("training.train", run_name="__main__", alter_sys=True)
