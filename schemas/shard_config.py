"""Settings of the shard stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from schemas.validation import SETTINGS

SourceFormat = Literal["auto", "folder", "sa1b", "img2dataset", "parquet"]
CropMode = Literal["center", "none"]

MIB = 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 256 * MIB
# Room for SA-1B annotation files (RLE masks of up to hundreds of objects); alt text and
# img2dataset metadata are far smaller.
DEFAULT_MAX_SIDECAR_BYTES = 16 * MIB
DEFAULT_MAX_OUTPUT_SIDE = 8192
JPEG_MAX_SIDE = 65535


class ImageSettings(BaseModel):
    """How each image is checked, resized and encoded."""

    model_config = SETTINGS

    # Declared first so that the check of ``resize`` sees it; dumped only when not the default (below).
    max_output_side: int = Field(
        DEFAULT_MAX_OUTPUT_SIDE, ge=1, le=JPEG_MAX_SIDE, description="the largest --resize accepted"
    )
    resize: int = Field(512, ge=0, description="short side in pixels after resizing; 0 keeps the size")
    crop: CropMode = "none"
    min_size: int = Field(64, ge=1, description="images whose short side is smaller are skipped")
    max_aspect: float = Field(4.0, ge=1.0, description="images whose long/short side ratio is larger are skipped")
    max_pixels: int = Field(
        100_000_000, gt=0, description="images with more pixels, or whose resized image would have more, are skipped"
    )
    jpeg_quality: int = Field(95, ge=1, le=100)

    @model_serializer(mode="wrap")
    def _dump_without_default_bound(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The dump of settings made before ``max_output_side`` existed is unchanged by it.

        Shard fingerprints hash this dump: with the default bound (which changes no output) they stay
        as they were, so finished shards are reused; any other value still round-trips through a dump.
        """
        data = handler(self)
        if data.get("max_output_side") == DEFAULT_MAX_OUTPUT_SIDE:
            del data["max_output_side"]
        return data

    @field_validator("resize")
    @classmethod
    def _resize_within_max_output_side(cls, resize: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_output_side")
        if limit is not None and resize > limit:
            raise ValueError(
                f"--resize {resize} is above --max-output-side {limit}; raise --max-output-side (at most "
                f"{JPEG_MAX_SIDE}) to make larger images"
            )
        return resize

    @field_validator("max_pixels")
    @classmethod
    def _resized_images_fit(cls, max_pixels: int, info: ValidationInfo) -> int:
        resize = info.data.get("resize")
        if resize and resize * resize > max_pixels:
            raise ValueError(
                f"--resize {resize} makes images of at least {resize}x{resize} = {resize * resize} pixels, "
                f"more than --max-pixels {max_pixels}; lower --resize or raise --max-pixels"
            )
        return max_pixels


class SourceSettings(BaseModel):
    """How inputs are found, named and read."""

    model_config = SETTINGS

    format: SourceFormat = "auto"
    source_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_]+$", description="key prefix; default: the format's name"
    )
    image_column: str = "image_path"
    caption_column: str | None = "caption"
    id_column: str | None = None
    max_file_bytes: int = Field(
        DEFAULT_MAX_FILE_BYTES, ge=1, description="image files (and tar members) larger than this are skipped"
    )
    max_sidecar_bytes: int = Field(
        DEFAULT_MAX_SIDECAR_BYTES, ge=1, description=".json/.txt sidecars larger than this skip their record"
    )


class ShardConfig(BaseModel):
    """Everything `densecurate shard` runs with."""

    model_config = SETTINGS

    sources: SourceSettings = SourceSettings()
    image: ImageSettings = ImageSettings()
    shard_size: int = Field(1000, ge=1)
    workers: int | None = Field(None, ge=1, description="shards processed at once; default: all CPUs")
    ray_address: str | None = None
    repair: bool = Field(False, description="check finished outputs in depth and redo the damaged ones")
    replace: bool = Field(False, description="let this run replace or remove finished outputs of an earlier run")
