"""Sample-set files on disk: where a set lives, how much room a volume has, removing a set.

A set's file is created sparse, so a volume's free space overstates its room: the sets
still running will fill the holes. The room for a new set is the free space less the bytes
the sets on that volume have reserved but not yet written (their full size less the blocks
their file already holds). Only entries named like a set id are ever removed, so a volume
may hold other things.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

SET_ID = re.compile(r"^b[0-9a-f]{23}$")  # service.batches.sets.new_batch_id

# A write failing with one of these will fail again on redelivery: the set is stopped instead.
DISK_ERRORS = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EFBIG: "disk_full",
               errno.EIO: "io_error", errno.EROFS: "io_error"}


def set_dir(volume_dir: Path, batch_id: str) -> Path:
    return Path(volume_dir) / batch_id


def images_file(volume_dir: Path, batch_id: str) -> Path:
    return set_dir(volume_dir, batch_id) / "images.u8"


def disk_error(err: BaseException) -> str | None:
    """"disk_full" or "io_error" for an error that retrying the write cannot cure; else None."""
    return DISK_ERRORS.get(getattr(err, "errno", None)) if isinstance(err, OSError) else None


@dataclass
class Room:
    free: int  # bytes free on the volume (for unprivileged writers)
    unwritten: int  # bytes the sets on it have reserved but not yet written

    @property
    def left(self) -> int:
        return max(0, self.free - self.unwritten)


def room(volume_dir: Path, held: dict[str, int]) -> Room:
    """The room for a new set on `volume_dir`, given the full sizes of the sets it holds."""
    Path(volume_dir).mkdir(parents=True, exist_ok=True)
    st = os.statvfs(volume_dir)
    unwritten = 0
    for batch_id, nbytes in held.items():
        try:
            allocated = os.stat(images_file(volume_dir, batch_id)).st_blocks * 512
        except FileNotFoundError:  # reserved, its file not made yet (or being removed)
            allocated = 0
        unwritten += max(0, nbytes - allocated)
    return Room(free=st.f_bavail * st.f_frsize, unwritten=unwritten)


def make_file(volume_dir: Path, batch_id: str, nbytes: int) -> Path:
    """The set's file, sparse and full size: writing image i never moves another."""
    path = images_file(volume_dir, batch_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return path


def remove_set(volume_dir: Path, batch_id: str) -> bool:
    """Remove a set's directory; True if it is gone afterwards."""
    if not SET_ID.match(batch_id):  # never follow a client-sent name outside the volume
        return False
    path = set_dir(volume_dir, batch_id)
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


def set_ids_on(volume_dir: Path) -> list[str]:
    """Ids of the sets with a directory on this volume (nothing else there is touched)."""
    try:
        return [e.name for e in os.scandir(volume_dir) if SET_ID.match(e.name) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
