"""Request and response bodies, and how a request becomes (class id, seed, preset)."""

from __future__ import annotations

import difflib
import math
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr

from model.bundle import BundleSpec
from model.sampling import SamplerPreset

MAX_SEED = 2**63


def _json_int(value):
    """Integers as JSON Schema means them: 7 and 7.0, never true/false or "7"."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        value = int(value)
    return value


def _json_number(value):
    """Numbers as JSON means them: never true/false or a string."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


def json_int(**bounds):
    # The bounds go before the validator: pydantic then publishes them as minimum/maximum.
    return Annotated[int, Field(**bounds), BeforeValidator(_json_int)]


def json_number(**bounds):
    return Annotated[float, Field(**bounds), BeforeValidator(_json_number)]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class_label: json_int() | StrictStr = Field(description="Class id, or a class name of this model.")
    seed: json_int(ge=0, lt=MAX_SEED) = Field(description="Seed of the initial noise.")
    preset: StrictStr | None = Field(None, max_length=64, description="Sampler preset; default: the model's.")
    steps: json_int(ge=2, le=1000) | None = Field(None, description="Time-grid points (N points = N-1 steps).")
    cfg_scale: json_number(ge=0, le=100) | None = Field(None, description="CFG scale (<= 1: off).")
    cfg_interval_start: json_number(ge=0, le=1) | None = Field(None, description="Guide only from this t (0 = noise) on.")
    timestep_shift: json_number(ge=0, le=10) | None = Field(None, description="Grid shift (0: none).")


class FieldError(ValueError):
    """A request value that the schema accepts but the model does not."""

    def __init__(self, field: str, message: str, **extra):
        super().__init__(message)
        self.field = field
        self.extra = extra


def resolve_class(spec: BundleSpec, label: int | str) -> int:
    if isinstance(label, int):
        if not 0 <= label < spec.num_classes:
            raise FieldError("class_label", f"class id {label} is out of range [0, {spec.num_classes})")
        return label
    names = spec.class_names
    if label in names:
        return names.index(label)
    lowered = {n.lower(): i for i, n in enumerate(names)}
    if label.strip().lower() in lowered:
        return lowered[label.strip().lower()]
    if label.strip().isdigit():
        return resolve_class(spec, int(label.strip()))
    close = difflib.get_close_matches(label.lower(), list(lowered), n=5, cutoff=0.5)
    raise FieldError(
        "class_label", f"unknown class name {label!r}",
        closest=[names[lowered[c]] for c in close],
    )


def resolve_preset(spec: BundleSpec, req: GenerateRequest) -> SamplerPreset:
    name = req.preset or spec.default_preset
    if name not in spec.presets:
        raise FieldError("preset", f"unknown preset {name!r}; this model has {sorted(spec.presets)}")
    for field in ("cfg_scale", "cfg_interval_start", "timestep_shift"):
        value = getattr(req, field)
        if value is not None and not math.isfinite(value):
            raise FieldError(field, "must be a finite number")
    return spec.presets[name].replace(
        num_steps=req.steps,
        cfg_scale=None if req.cfg_scale is None else float(req.cfg_scale),
        cfg_interval_start=None if req.cfg_interval_start is None else float(req.cfg_interval_start),
        timestep_shift=None if req.timestep_shift is None else float(req.timestep_shift),
    )


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


class ModelInfo(BaseModel):
    name: str
    version: str
    num_classes: int
    class_names: list[str]
    resolution: int
    latent_shape: list[int]
    backend: str
    precision: str
    presets: dict[str, dict]
    default_preset: str


class ErrorBody(BaseModel):
    error: str
    message: str
    detail: list[dict] | None = None
