"""Request/response models of the HTTP API and the 422 error format (field + rule).

    req = GenerateRequest.model_validate({"class_ids": [3], "num_images": 4, "seed": 7})
    spec = req.to_spec(seed=req.seed)           # sampling.SampleSpec, class ids expanded per image
    body = validation_body(exc.errors())       # {"error": {"type": "invalid_request", "errors": [...]}}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from detailflow.platform.serving.sampling import SampleSpec

MAX_SEED = 2**63 - 1
MAX_TOP_K = 1 << 20  # >= any codebook; an unbounded int (2**70) overflowed the engine's int64 settings
HARD_MAX_IMAGES = 256  # schema bound; the served model's max_images_per_request is the real one


class GenerateRequest(BaseModel):
    """POST /v1/generate and /v1/generate/stream (GET takes the same fields as query parameters)."""

    model_config = ConfigDict(extra="forbid")

    class_ids: list[Annotated[int, Field(ge=0)]] = Field(
        ..., min_length=1, max_length=HARD_MAX_IMAGES,
        description="Class ids to draw (ImageNet ids for the paper models); each gets num_images images.")
    num_images: int = Field(1, ge=1, le=HARD_MAX_IMAGES, description="Images per class id. In all, "
                            "len(class_ids) * num_images may not exceed the model's max_images_per_request.")
    cfg_scale: float = Field(1.5, ge=1.0, le=100.0, description="Classifier-free guidance scale; 1 = none.")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="Sampling temperature; 0 = argmax.")
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="Keep the k most likely codes; 0 = off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass; 1 = off.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same seed + same model version = same "
                             "images. Omitted: the server picks one and returns it.")
    tokens: int = Field(0, ge=0, description="Prefix length t to sample (0 = all N). Fewer tokens = a "
                        "coarser, smaller image c(t) in fewer passes; GET /v1/models lists the allowed t.")
    format: Literal["png", "json", "grid"] | None = Field(
        None, description="POST /v1/generate only. png: PNG bytes (image/png for one image, "
        "multipart/mixed with one image/png part per image for several), metadata in X-* headers; json: "
        "base64 PNGs + metadata; grid: one PNG of all images. Omitted: chosen by the Accept header (no "
        "Accept or */*: png). An Accept that excludes the format's type is a 406.")

    def to_spec(self, seed: int) -> SampleSpec:
        ids = [c for c in self.class_ids for _ in range(self.num_images)]
        return SampleSpec(ids, self.cfg_scale, self.temperature, self.top_k, self.top_p, seed, self.tokens)


class GenerateResponse(BaseModel):
    model: str = Field(description="Registered model served, e.g. smoke-generator.")
    model_version: str = Field(description="Registered version that produced the images.")
    seed: int = Field(description="The seed used (pass it again for the same images).")
    tokens: int = Field(description="Prefix length decoded.")
    canvas: int = Field(description="Side of each image in pixels, c(tokens).")
    class_ids: list[int] = Field(description="Class id of each image, in order.")
    images: list[str] = Field(description="Base64 PNG per image.")
    batch: dict = Field(description="Requests and images in the sampler call that produced these.")
    replica: str = Field(description="Generator replica id.")
    cached: bool = Field(description="Served from the replica's result cache (a seeded request seen before).")
    timing: dict = Field(description="queue_s, sample_s, total_s.")


class ErrorItem(BaseModel):
    field: str = Field(description="Dotted name of the offending field ('body' for the body itself).")
    rule: str = Field(description="The rule it breaks.")


class ErrorBody(BaseModel):
    type: str = Field(description="invalid_request | unauthorized | forbidden | overloaded | ...")
    message: str
    errors: list[ErrorItem] = []


class ErrorResponse(BaseModel):
    error: ErrorBody


def _rule(err: dict) -> str:
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    simple = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in simple:
        op, key = simple[kind]
        return f"must be {op} {ctx.get(key)}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be an integer"
    if kind in ("float_parsing", "float_type"):
        return "must be a number"
    if kind in ("list_type",):
        return "must be a list"
    if kind in ("model_attributes_type", "dict_type"):
        return "must be a JSON object"
    return err.get("msg", kind)


def field_name(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query")]
    return ".".join(parts) or "body"


def validation_body(errors: list[dict]) -> dict:
    items = []
    for e in errors:
        if e.get("type") == "json_invalid":  # loc is ("body", character offset)
            pos = e.get("loc", ("body", "?"))[-1]
            items.append({"field": "body", "rule": f"must be valid JSON (error at character {pos})"})
        else:
            items.append({"field": field_name(e.get("loc", ())), "rule": _rule(e)})
    message = "; ".join(f"{i['field']} {i['rule']}" for i in items)
    return {"error": {"type": "invalid_request", "message": message, "errors": items}}


def rule_body(errors: list[tuple[str, str]]) -> dict:
    items = [{"field": f, "rule": r} for f, r in errors]
    return {"error": {"type": "invalid_request", "message": "; ".join(f"{f} {r}" for f, r in errors),
                      "errors": items}}


def error_body(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message, "errors": []}}
