"""Request and response bodies, and how a request becomes (class id, seed, preset)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, WithJsonSchema

from model.bundle import BundleSpec
from model.classes import DIGITS, UnknownClass
from model.sampling import SamplerPreset, time_grid_values

MAX_SEED = 2**63
DIGITS_PATTERN = "^[0-9]{1,19}$"
# Below this the release's float32 shift formula collapses at the data end (1e-7 ends the grid
# at 0.84, 1e-8 at inf): the grid would no longer run from 0 to 1.
MIN_TIMESTEP_SHIFT = 0.01


class HugeInt:
    """A JSON integer too long for Python's int() (over 4300 digits): kept as its digit count."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))


def parse_json_int(text: str) -> int | HugeInt:
    """json.loads' parse_int: the request's own error names the field, not a JSON parse failure."""
    return HugeInt(text) if len(text) > 4000 else int(text)


def _json_int(value):
    """Integers as JSON Schema means them: 7 and 7.0, never true/false or "7"."""
    if isinstance(value, HugeInt):
        raise ValueError(f"integer out of range ({value.digits} digits)")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        value = int(value)
    return value


def _json_number(value):
    """Finite numbers as JSON means them: never true/false, a string, NaN or infinity."""
    if isinstance(value, HugeInt):
        raise ValueError(f"number out of range ({value.digits} digits)")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def json_int(**bounds):
    # The bounds go before the validator: pydantic then publishes them as minimum/maximum.
    return Annotated[int, Field(**bounds), BeforeValidator(_json_int)]


def _numeric_int(value):
    """The one rule for numeric strings, for `seed` and `class_label` alike: "42" means 42.

    At most 19 ASCII digits ("²" or "٣" is not a number here). A class label string is a
    name first: model/classes.py reads digits as an id only when no class has that name.
    """
    if isinstance(value, str):
        if not DIGITS.fullmatch(value):
            raise ValueError("must be an integer, or a string of at most 19 ASCII digits")
        return int(value)
    return _json_int(value)


def numeric_int(**bounds):
    """An integer that may also come as a string of digits (published as both in the JSON Schema)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_numeric_int),
                     WithJsonSchema({"anyOf": [{"type": "integer", **_schema_bounds(bounds)},
                                               {"type": "string", "pattern": DIGITS_PATTERN}]})]


def _schema_bounds(bounds: dict) -> dict:
    names = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
    return {names[k]: v for k, v in bounds.items()}


def json_number(**bounds):
    return Annotated[float, Field(**bounds), BeforeValidator(_json_number)]


class SamplerChoice(BaseModel):
    """The sampler of a request: a preset of the model, and optional overrides."""

    model_config = ConfigDict(extra="forbid")

    preset: StrictStr | None = Field(None, max_length=64, description="Sampler preset; default: the model's.")
    steps: json_int(ge=2, le=1000) | None = Field(None, description=(
        "Time-grid points (N points = N-1 steps): 100 runs 99 Euler steps, and its progress events count of 99."))
    cfg_scale: json_number(ge=0, le=100) | None = Field(None, description="CFG scale (<= 1: off).")
    cfg_interval_start: json_number(ge=0, le=1) | None = Field(None, description="Guide only from this t (0 = noise) on.")
    timestep_shift: json_number(ge=0, le=10) | None = Field(
        None, description=f"Grid shift: 0 (none) or from {MIN_TIMESTEP_SHIFT} to 10.")


class OutputChoice(BaseModel):
    """The image format of an answer (service/image_formats.py); an Accept header may choose it instead."""

    model_config = ConfigDict(extra="forbid")

    output_format: Literal["png", "webp", "jpeg"] | None = Field(None, description=(
        "png (default), webp (lossless) or jpeg. Without it the Accept header chooses (q-values honoured)."))
    output_compression: json_int(ge=0, le=100) | None = Field(None, description=(
        "Quality 0-100: JPEG quality (default 90); WebP below 100 is lossy at that quality (default: lossless); "
        "ignored for png."))


class GenerateRequest(SamplerChoice, OutputChoice):
    class_label: json_int() | StrictStr = Field(
        description="Class id (an integer, or a string of ASCII digits), or a class name or synonym of this model.")
    seed: numeric_int(ge=0, lt=MAX_SEED) = Field(
        description="Seed of the initial noise: an integer, or a string of ASCII digits.")


class BatchRequest(SamplerChoice):
    """A sample set: `per_class` images of each class, seeds seed_start, seed_start + 1, ..."""

    classes: Literal["all"] | Annotated[list[json_int() | StrictStr], Field(min_length=1, max_length=100000)] = Field(
        description='"all", or class ids / names (the set is class-major, in this order).')
    per_class: json_int(ge=1, le=1_000_000) = Field(description="Images of each class.")
    seed_start: numeric_int(ge=0, lt=MAX_SEED) = Field(
        0, description="Seed of each class's first image; image j of a class has seed seed_start + j.")
    volume: StrictStr = Field("default", max_length=64, description=(
        "Where its file goes: `default` (LDIT_BATCH_DIR) or a name of LDIT_BATCH_VOLUMES."))


class BatchAccepted(BaseModel):
    id: str
    status: str
    total: int
    status_url: str
    samples_url: str
    images_url: str


class BatchStatus(BaseModel):
    id: str
    status: str = Field(description="running | done | failed (some images failed; see `failed`)")
    total: int
    done: int
    failed: int
    enqueued: int = Field(description="Jobs appended to the queue so far (appending resumes after an API restart).")
    error: str | None = Field(None, description="Why a stopped set failed: disk_full, io_error, no_volume.")
    message: str | None = Field(None, description="The failure in words (the errno's text, which image, which volume).")
    bytes: int = Field(description="Size of its file: images x H x W x 3.")
    volume: str = Field(description="The volume holding its file (`default`: LDIT_BATCH_DIR).")
    images_per_s: float | None = Field(None, description="Since the first image was done.")
    eta_s: float | None = Field(None, description="Seconds left at that rate.")
    num_classes: int
    per_class: int
    seed_start: int
    preset: str
    sampler: dict
    model_version: str = Field(description="The model version the API saw when the set was created.")
    created_at: float
    samples_url: str
    images_url: str


class BatchDeleted(BaseModel):
    id: str
    status: Literal["deleted"]
    dropped_jobs: int = Field(description="Its jobs still queued, removed from the queue.")
    freed_bytes: int = Field(description="The size of its file, now removed (0 if another process removes it).")


class FieldError(ValueError):
    """A request value that the schema accepts but the model does not."""

    def __init__(self, field: str, message: str, **extra):
        super().__init__(message)
        self.field = field
        self.extra = extra


def resolve_class(spec: BundleSpec, label: int | str) -> int:
    """A class id from an id, a digit string, a name or a synonym (model/classes.py)."""
    try:
        return spec.classes.resolve(label)
    except UnknownClass as err:
        raise FieldError("class_label", str(err), closest=err.suggestions) from None


def resolve_preset(spec: BundleSpec, req: GenerateRequest) -> SamplerPreset:
    name = req.preset or spec.default_preset
    if name not in spec.presets:
        raise FieldError("preset", f"unknown preset {name!r}; this model has {sorted(spec.presets)}")
    preset = spec.presets[name].replace(
        num_steps=req.steps,
        cfg_scale=None if req.cfg_scale is None else float(req.cfg_scale),
        cfg_interval_start=None if req.cfg_interval_start is None else float(req.cfg_interval_start),
        timestep_shift=None if req.timestep_shift is None else float(req.timestep_shift),
    )
    check_time_grid(preset)
    return preset


def check_time_grid(preset: SamplerPreset) -> None:
    """Every accepted request integrates over a finite, non-decreasing grid from exactly 0 to exactly 1."""
    shift = preset.timestep_shift
    if 0 < shift < MIN_TIMESTEP_SHIFT:
        raise FieldError("timestep_shift", f"timestep_shift {shift:g} is too small: use 0 (no shift) or at least "
                                           f"{MIN_TIMESTEP_SHIFT} (smaller shifts lose the grid's end to float32 rounding)")
    grid = time_grid_values(preset.num_steps, shift)
    if not (all(map(math.isfinite, grid)) and grid[0] == 0.0 and grid[-1] == 1.0
            and all(b >= a for a, b in zip(grid, grid[1:], strict=False))):
        raise FieldError("timestep_shift", f"timestep_shift {shift:g} with {preset.num_steps} steps gives no "
                                           f"time grid from 0 to 1 (it ends at {grid[-1]:g})")


class JobAccepted(BaseModel):
    id: str
    status: str
    status_url: str
    image_url: str


class JobStatus(BaseModel):
    id: str
    status: str  # queued | running | done | failed
    error: str | None = None
    message: str | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    batch_size: int | None = None
    model_version: str | None = None
    cache: str = Field("miss", description="hit: answered from the result cache, nothing was queued or computed.")


class WorkerInfo(BaseModel):
    """What one live worker runs, from its last heartbeat."""

    name: str
    model_version: str
    backend: str
    precision: str
    device: str
    max_rows: int | None = Field(None, description="Most DiT rows per forward (LDIT_MAX_BATCH_SIZE).")
    batching: str | None = None
    active: int = Field(0, description="Samples it was denoising at its last heartbeat.")
    age_s: float = Field(description="Seconds since its last heartbeat.")
    simulated_profile: str | None = Field(
        None, description="Backend simulated only: the timing profile it waits by (it runs no model).")
    image_size: int | None = Field(None, description="Backend simulated only: the size of the images it makes.")


class ApiView(BaseModel):
    """This API process's own view: the bundle it validates requests against and its settings.

    The API runs no model: its backend and precision are only what it is configured with;
    `workers` says what really runs."""

    model_version: str
    backend: str
    precision: str


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="Version of the bundle the API validates against (see `api`, `workers`).")
    num_classes: int
    class_names: list[str]
    resolution: int
    latent_shape: list[int]
    presets: dict[str, dict]
    default_preset: str
    api: ApiView
    workers: list[WorkerInfo] = Field(description="Live workers (fresh heartbeats): what really generates images.")


class ErrorBody(BaseModel):
    error: str
    message: str
    detail: list[dict] | None = None

