"""Deprecated alias of `python -m training.train_vae`; kept for one release, then removed.

Prints a notice and runs `training.train_vae` with the same arguments. Importing it is an error:
the code lives in `training.train_vae`.
"""

import runpy
import sys

if __name__ != "__main__":
    raise ImportError("model.train_vae moved to training.train_vae; import it from there")
print("model.train_vae is deprecated and goes in the next release; use: python -m training.train_vae", file=sys.stderr)
runpy.run_module("training.train_vae", run_name="__main__", alter_sys=True)
