"""Prometheus metrics, named after Triton's (`nv_inference_*` -> `ldit_inference_*`).

API-side and worker-side metrics live in the default registry: in the
all-in-one process both show on the API's /metrics; a standalone worker serves
its own on `metrics_port`.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)

# -- API --------------------------------------------------------------------------
REQUEST_SUCCESS = Counter("ldit_inference_request_success", "Requests answered with an image.", ["endpoint"])
REQUEST_FAILURE = Counter(
    "ldit_inference_request_failure", "Requests that failed, by reason.", ["endpoint", "reason"]
)
REQUEST_DURATION = Histogram(
    "ldit_inference_request_duration_seconds", "End-to-end time of /generate as the API sees it: answered with an "
    "image, or with 504 at the request timeout.",
    buckets=LATENCY_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "ldit_http_requests", "Every HTTP answer, by route template and status class (2xx, 4xx, 5xx...).",
    ["endpoint", "status_class"],
)
SSE_STREAMS = Gauge("ldit_sse_streams", "Open Server-Sent Events streams (GET /jobs/{id}/events) of this process.")
PENDING_REQUESTS = Gauge("ldit_inference_pending_request_count", "Jobs in the queue stream (waiting or running).")
CACHE_HITS = Counter("ldit_result_cache_hits", "Requests answered from the result cache.")
IMAGE_ENCODES = Counter("ldit_image_format_answers", "Images answered in WebP or JPEG, by format and whether "
                        "the encoded bytes came from the cache (hit) or were encoded from the PNG (miss).",
                        ["format", "cache"])
QUEUE_FULL = Counter("ldit_queue_full_rejections", "Requests refused with 429 because the queue was full.")

# -- worker ---------------------------------------------------------------------
QUEUE_DURATION = Histogram(
    "ldit_inference_queue_duration_seconds", "From acceptance to the first sampler step.", buckets=LATENCY_BUCKETS
)
COMPUTE_DURATION = Histogram(
    "ldit_inference_compute_duration_seconds", "From the first sampler step to the PNG.", buckets=LATENCY_BUCKETS
)
IMAGES = Counter("ldit_inference_count", "Images generated.")
EXEC_COUNT = Counter("ldit_inference_exec_count", "DiT forwards executed.")
ROWS_PER_FORWARD = Histogram("ldit_rows_per_forward", "DiT rows (cond + uncond) per forward.", buckets=ROW_BUCKETS)
BATCH_SIZE = Histogram("ldit_batch_size", "Samples advanced per forward.", buckets=ROW_BUCKETS)
DECODE_BATCH = Histogram("ldit_decode_batch_size", "Latents per VAE decode.", buckets=ROW_BUCKETS)
ACTIVE_SLOTS = Gauge("ldit_active_slots", "Samples being denoised by this worker.")
ADMITTED_MID_FLIGHT = Counter(
    "ldit_admitted_mid_flight", "Samples admitted while others were between steps (step-level batching)."
)
BUSY_RATIO = Gauge("ldit_worker_busy_ratio", "Share of the last interval the worker spent computing.")
DEAD_LETTERS = Counter("ldit_dead_letters", "Jobs moved to the dead-letter stream.")
EXPIRED = Counter("ldit_expired_jobs", "Jobs dropped because their deadline passed.")
ENGINE = Info("ldit_engine", "What this worker's engine is: backend (\"simulated\" for a timing model), device, "
              "precision, and the timing profile of a simulated one.")
RECLAIMED = Counter("ldit_reclaimed_jobs", "Jobs claimed from a silent worker (XAUTOCLAIM).")

# -- sample sets (POST /batches) -------------------------------------------------------
BATCH_IMAGES_WRITTEN = Counter(
    "ldit_batch_images_written", "Sample-set images written to their set's file (rate(): images written per second)."
)
BATCH_WRITE_ERRORS = Counter(
    "ldit_batch_write_errors", "Sample-set images whose write failed with a disk error, stopping their set; by "
    "reason (disk_full, io_error, no_volume).", ["reason"],
)
BATCH_SAMPLES_DROPPED = Counter(
    "ldit_batch_samples_dropped", "Sample-set jobs a worker dropped, queued or mid-sampling, because their set was "
    "deleted, expired or stopped.",
)
BATCH_BYTES = Gauge(
    "ldit_batch_bytes", "Bytes held by sample sets (each file's full size, until the file is removed), all volumes."
)
BATCH_SETS = Gauge("ldit_batch_sets", "Sample sets whose file is held, by state (running, done, failed).", ["state"])
BATCH_FILES_SWEPT = Counter(
    "ldit_batch_files_swept", "Sample-set files removed by the sweeper (expired sets, files no set owns)."
)

# -- operations (the dashboard and alert rules: helm/lightningdit/dashboards, helm/lightningdit/rules) ----
REQUEST_TIMEOUT = Gauge(
    "ldit_request_timeout_seconds", "LDIT_REQUEST_TIMEOUT_S of this process: a job's deadline from acceptance "
    "(the latency alert compares the p99 with it).",
)
REDIS_UP = Gauge(
    "ldit_redis_up", "1 when this process's last look at Redis succeeded (the API's at each scrape, a worker's at "
    "each heartbeat), 0 when it failed.",
)
REDIS_ERRORS = Counter(
    "ldit_redis_errors", "Redis calls that failed (unreachable, timed out, loading), after the client's retries, "
    "by role (api, worker).", ["role"],
)
REDIS_CONNECTIONS = Counter(
    "ldit_redis_connections_opened", "Connections this process opened to Redis: the pool's first ones, then one "
    "for every reconnect after a lost connection.",
)
HTTP_CONNECTIONS_REFUSED = Counter(
    "ldit_http_connections_refused", "Connections answered 503 and closed at once because LDIT_MAX_HTTP_CONNECTIONS "
    "were open (they never reach a route, so ldit_http_requests does not count them).",
)
WORKER_HEARTBEATS = Counter(
    "ldit_worker_heartbeats", "Heartbeats this worker wrote (one every LDIT_HEARTBEAT_INTERVAL_S while its loop "
    "ticks; a stalled loop stops them).",
)
HELD_JOBS = Gauge(
    "ldit_worker_held_jobs", "Jobs this worker holds: read from the queue and not yet stored (waiting for a row, "
    "being denoised, decoding, being stored).",
)
PADDING_ROWS = Counter(
    "ldit_padding_rows", "DiT rows computed only to fill a forward up to the size its engine runs (a CUDA graph's "
    "batch bucket, a TensorRT profile's minimum); their outputs are dropped.",
)
MODEL_SWAPS = Counter(
    "ldit_model_swaps", "Hot checkpoint swaps of this worker, by result (switched, failed: the new checkpoint did "
    "not load and the old one keeps serving).", ["result"],
)
# API only (registered by the API app, so a standalone worker does not export them as zeros).
LIVE_WORKERS = Gauge(
    "ldit_live_workers", "Workers with a fresh heartbeat, as this API reads them at each scrape.", registry=None,
)
OLDEST_JOB_AGE = Gauge(
    "ldit_queue_oldest_job_age_seconds", "Age of the oldest job in the queue stream (waiting or running), read at "
    "each scrape; 0 when the queue is empty.", registry=None,
)
API_ONLY = (LIVE_WORKERS, OLDEST_JOB_AGE)

# Known label values start at 0, so a rate() over them is 0 rather than no data.
for _result in ("switched", "failed"):
    MODEL_SWAPS.labels(_result)
for _reason in ("disk_full", "io_error", "no_volume"):
    BATCH_WRITE_ERRORS.labels(_reason)


def register_api_metrics() -> None:
    """Export the API-only gauges from this process (idempotent: several apps may share a process in tests)."""
    for metric in API_ONLY:
        try:
            REGISTRY.register(metric)
        except ValueError:  # already registered
            pass


def init_role(role: str, request_timeout_s: float) -> None:
    """The series a process of this role (api, worker) always exports, from its start."""
    REDIS_ERRORS.labels(role)
    REQUEST_TIMEOUT.set(request_timeout_s)
    if role == "api":
        register_api_metrics()
        for endpoint in ("generate", "jobs"):  # the admission's refusals (429/503)
            for reason in ("full", "busy", "no_worker"):
                REQUEST_FAILURE.labels(endpoint, reason)
