"""Notices a new checkpoint published into the model directory.

`training.train` writes a bundle's weights first and its `manifest.json` last (each
file atomically), so a changed manifest means a complete new bundle. Both the
API (for /v1/model and the result-cache key) and the worker (to hot-swap its
engine) watch the same files; a check is one `stat` at most every `interval_s`.
"""

from __future__ import annotations

import time
from pathlib import Path

from model.bundle import BundleSpec, read_spec


def _stamp(root: Path) -> tuple:
    out = []
    for name in ("manifest.json", "model.json"):
        try:
            st = (root / name).stat()
            out.append((st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


class ModelWatcher:
    def __init__(self, root: Path, interval_s: float):
        self.root = Path(root)
        self.interval_s = interval_s
        self._stamp = _stamp(self.root)
        self.spec = read_spec(self.root)
        self.version = self.spec.version()
        self._checked = time.monotonic()

    def poll(self) -> BundleSpec | None:
        """The new spec when the bundle changed since the last poll (None otherwise, or when off)."""
        if self.interval_s <= 0 or time.monotonic() - self._checked < self.interval_s:
            return None
        self._checked = time.monotonic()
        stamp = _stamp(self.root)
        if stamp == self._stamp:
            return None
        try:
            spec = read_spec(self.root)
            version = spec.version()
        except Exception:  # noqa: BLE001 - a half-published bundle: look again next time
            return None
        self._stamp = stamp
        if version == self.version:
            return None
        self.spec, self.version = spec, version
        return spec
