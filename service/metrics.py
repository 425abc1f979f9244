"""Prometheus metrics, named after Triton's (`nv_inference_*` -> `ldit_inference_*`).

API-side and worker-side metrics live in the default registry: in the
all-in-one process both show on the API's /metrics; a standalone worker serves
its own on `metrics_port`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)

# -- API --------------------------------------------------------------------------
REQUEST_SUCCESS = Counter("ldit_inference_request_success", "Requests answered with an image.", ["endpoint"])
REQUEST_FAILURE = Counter(
    "ldit_inference_request_failure", "Requests that failed, by reason.", ["endpoint", "reason"]
)
REQUEST_DURATION = Histogram(
    "ldit_inference_request_duration_seconds", "End-to-end time of /generate as the API sees it.",
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
