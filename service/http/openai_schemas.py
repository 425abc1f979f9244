"""The bodies of POST /v1/images/generations (service/http/routes/openai_images.py): the OpenAI Images
API's request, response and error, as far as a class-conditional model allows (docs/clients.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, StrictStr

from service.http.schemas import MAX_SEED, SamplerChoice, json_int, numeric_int

IGNORED = "Accepted and ignored"


def refusing(refused, why: str) -> BeforeValidator:
    """Values of an OpenAI field this service cannot honour, refused with the reason. The schema
    publishes the values that are accepted, so a refused one is schema-invalid as well."""
    def check(value):
        if refused(value):
            raise ValueError(why)
        return value
    return BeforeValidator(check)


def gif_or_svg_only(what: str) -> BeforeValidator:
    return refusing(lambda v: v is not None, f"applies to {what} output, which this service does not make "
                                               "(png, webp, jpeg)")


class ImagesRequest(SamplerChoice):
    """The OpenAI Images API's body, as far as a class-conditional model allows (docs/clients.md);
    `seed`, `preset`, `steps`, `cfg_scale`, ... are this service's extensions."""

    prompt: StrictStr = Field(min_length=1, max_length=1000, description=(
        "A class of this model: its name, a synonym or its id (the same resolution as /generate's class_label)."))
    model: StrictStr | None = Field(None, max_length=256, description=(
        f"{IGNORED}: this service serves one model (GET /v1/model)."))
    n: json_int(ge=1, le=10) | None = Field(None, description=(
        "Images, 1-10 (default 1): seeds seed, seed + 1, ..., queued together so the workers batch them."))
    size: StrictStr | None = Field(None, max_length=32, description=(
        '"auto" or the model\'s own size "RxR" (R: GET /v1/model `resolution`); any other size is refused.'))
    response_format: Literal["b64_json", "url"] | None = Field(None, description=(
        "b64_json (default): the image in the JSON; url: the job's /jobs/{id}/image (same API key)."))
    output_format: Literal["png", "webp", "jpeg"] | None = Field(None, description=(
        "png (default), webp (lossless unless output_compression < 100) or jpeg; gif and svg are refused."))
    output_compression: json_int(ge=0, le=100) | None = Field(None, description=(
        "Quality 0-100 for webp and jpeg (JPEG default 90; WebP 100 = lossless, the default); ignored for png."))
    user: StrictStr | None = Field(None, max_length=256, description=f"{IGNORED} (logged nowhere).")
    safety_identifier: StrictStr | None = Field(None, max_length=256, description=f"{IGNORED} (logged nowhere).")
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = Field(
        None, description=f"{IGNORED}: the sampler (preset, steps) sets the quality.")
    style: Literal["vivid", "natural"] | None = Field(None, description=f"{IGNORED}: a class has no style.")
    moderation: Literal["low", "auto"] | None = Field(None, description=f"{IGNORED}: nothing to moderate.")
    complexity: Literal["low", "medium", "high"] | None = Field(None, description=f"{IGNORED}.")
    background: Annotated[Literal["opaque", "auto"] | None, refusing(
        lambda v: v == "transparent", "'transparent' is not supported: this model's images are opaque")] = Field(
        None, description="auto or opaque (the images are opaque); transparent is refused.")
    stream: Annotated[Literal[False] | None, refusing(
        lambda v: v is True, "streaming is not supported: leave stream unset or false")] = Field(
        None, description="false only: streaming (partial images) is refused.")
    partial_images: Annotated[json_int(ge=0, le=0) | None, refusing(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 3,
        "partial images need streaming, which is not supported: use 0 or leave it unset")] = Field(
        None, description="0 only (no streaming).")
    frame_count: Annotated[None, gif_or_svg_only("GIF")] = Field(None, description="Refused: GIF output only.")
    frame_duration_ms: Annotated[None, gif_or_svg_only("GIF")] = Field(None, description="Refused: GIF output only.")
    svg: Annotated[None, gif_or_svg_only("SVG")] = Field(None, description="Refused: SVG output only.")
    seed: numeric_int(ge=0, lt=MAX_SEED) | None = Field(None, description=(
        "Extension: seed of the first image (image i: seed + i). Default: a random seed, returned in `data[].seed`."))


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="The image, base64 (response_format b64_json).")
    url: str | None = Field(None, description="The job's image URL (response_format url); needs the same API key.")
    revised_prompt: str = Field(description="The class name the prompt resolved to.")
    seed: int = Field(description="Extension: this image's seed (as /generate's `seed`).")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix seconds.")
    data: list[ImageData]
    output_format: Literal["png", "webp", "jpeg"]
    size: str
    background: Literal["opaque"] = "opaque"


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """The OpenAI API's error body, which its SDKs read."""

    error: OpenAIErrorDetail
