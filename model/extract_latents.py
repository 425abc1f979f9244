"""Deprecated alias of `python -m training.extract_latents`; kept for one release, then removed.

Prints a notice and runs `training.extract_latents` with the same arguments. Importing it is an error:
the code lives in `training.extract_latents`.
"""

import runpy
import sys

if __name__ != "__main__":
    raise ImportError("model.extract_latents moved to training.extract_latents; import it from there")
print("model.extract_latents is deprecated and goes in the next release; use: python -m training.extract_latents", file=sys.stderr)
runpy.run_module("training.extract_latents", run_name="__main__", alter_sys=True)
