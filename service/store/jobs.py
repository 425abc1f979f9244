"""What a job is, and where it lives in Redis.

A job travels as the fields of one Redis Stream entry. Its status lives in a
hash `<p>:job:<id>`; its image in `<p>:result:<key>` where `key` is a content
address (model version, class, seed, sampler settings), so identical requests
share one result; the same image in WebP or JPEG is kept beside it in
`<p>:result:<key>:<format tag>` once asked for. Every key expires after `result_ttl_s`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field

from model.sampling import SamplerPreset

GROUP = "workers"


@dataclass(frozen=True)
class Keys:
    prefix: str = "ldit"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def batch_stream(self) -> str:
        """Jobs of sample sets: read by workers only when the interactive stream has nothing waiting."""
        return f"{self.prefix}:jobs:batch"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def batch_done(self, batch_id: str) -> str:
        """Bitmap: bit i set once image i of the set is written (a redelivered job counts once)."""
        return f"{self.prefix}:batch:{batch_id}:done"

    def batch_lease(self, batch_id: str) -> str:
        """Held by the API process appending a set's jobs; another takes over when it lapses."""
        return f"{self.prefix}:batch:{batch_id}:lease"

    @property
    def batches(self) -> str:
        """Sorted set of every sample set's id, by creation time."""
        return f"{self.prefix}:batches"

    @property
    def batch_held(self) -> str:
        """Hash: set id -> {"bytes", "volume"} of every set file on disk, until the file is removed (budget)."""
        return f"{self.prefix}:batches:held"

    @property
    def batch_sweeper(self) -> str:
        """Lease of the API process now removing expired and unowned set files."""
        return f"{self.prefix}:batches:sweeper"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def result(self, key: str) -> str:
        return f"{self.prefix}:result:{key}"

    def result_format(self, key: str, tag: str) -> str:
        """The result `key` encoded as another format (service/image_formats.py: `OutputFormat.tag`)."""
        return f"{self.prefix}:result:{key}:{tag}"

    def notify(self, api_id: str) -> str:
        return f"{self.prefix}:notify:{api_id}"

    @property
    def events(self) -> str:
        """Pub/sub channel of job progress and endings (read by every API process for SSE)."""
        return f"{self.prefix}:events"

    @property
    def workers(self) -> str:
        """Hash of worker heartbeats: name -> JSON (service/store/heartbeats.py)."""
        return f"{self.prefix}:workers"

    @property
    def work(self) -> str:
        """Row-steps of the jobs in the stream (service/store/scripts.py)."""
        return f"{self.prefix}:work"

    def inflight(self, key: str) -> str:
        """The job now making the result `key` (single flight)."""
        return f"{self.prefix}:inflight:{key}"


def result_key(model_version: str, class_id: int, seed: int, preset: SamplerPreset) -> str:
    """Content address of an image: equal inputs give equal keys on every API replica."""
    body = json.dumps([model_version, class_id, seed, preset.to_dict()], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


@dataclass
class Job:
    class_id: int
    seed: int
    preset: SamplerPreset
    key: str
    deadline: float  # unix seconds
    reply_to: str = ""  # pub/sub channel of the waiting API process ("" for async jobs)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued_at: float = field(default_factory=time.time)
    cost: int = 0  # row-steps (service/store/capacity.py)
    stream_id: str = ""  # set when read from the stream
    deliveries: int = 1
    batch: str = ""  # the sample set this job is image `index` of ("" for interactive requests)
    index: int = 0
    stream: str = ""  # the stream it was read from (set by the worker)

    def to_fields(self) -> dict[str, str]:
        return {
            "id": self.id,
            "key": self.key,
            "class_id": str(self.class_id),
            "seed": str(self.seed),
            "preset": json.dumps(self.preset.to_dict()),
            "deadline": repr(self.deadline),
            "enqueued_at": repr(self.enqueued_at),
            "reply_to": self.reply_to,
            "cost": str(self.cost),
            **({"batch": self.batch, "index": str(self.index)} if self.batch else {}),
        }

    @classmethod
    def from_fields(cls, fields: dict, stream_id: str = "", deliveries: int = 1) -> Job:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in fields.items()}
        return cls(
            class_id=int(f["class_id"]),
            seed=int(f["seed"]),
            preset=SamplerPreset(**json.loads(f["preset"])),
            key=f["key"],
            deadline=float(f["deadline"]),
            reply_to=f.get("reply_to", ""),
            id=f["id"],
            enqueued_at=float(f["enqueued_at"]),
            cost=int(f.get("cost", 0)),
            stream_id=stream_id,
            deliveries=deliveries,
            batch=f.get("batch", ""),
            index=int(f.get("index", 0)),
        )

    def expired(self, now: float | None = None) -> bool:
        return (now or time.time()) > self.deadline


@dataclass
class ResultMeta:
    """What the HTTP response headers report about how an image was made."""

    queue_ms: float
    compute_ms: float
    batch_size: int  # most samples that shared a forward with this one
    model_version: str
    worker: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ResultMeta:
        return cls(**json.loads(raw))
