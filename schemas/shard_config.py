"""Settings of the shard stage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SourceFormat = Literal["auto", "folder", "sa1b", "img2dataset", "parquet"]
CropMode = Literal["center", "none"]


class ImageSettings(BaseModel):
    """How each image is checked, resized and encoded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resize: int = Field(512, ge=0, description="short side in pixels after resizing; 0 keeps the size")
    crop: CropMode = "none"
    min_size: int = Field(64, ge=1, description="images whose short side is smaller are skipped")
    max_aspect: float = Field(4.0, ge=1.0, description="images whose long/short side ratio is larger are skipped")
    max_pixels: int = Field(100_000_000, gt=0, description="images with more pixels are refused before decoding")
    jpeg_quality: int = Field(95, ge=1, le=100)


class SourceSettings(BaseModel):
    """How inputs are found and named."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: SourceFormat = "auto"
    source_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_]+$", description="key prefix; default: the format's name"
    )
    image_column: str = "image_path"
    caption_column: str | None = "caption"
    id_column: str | None = None


class ShardConfig(BaseModel):
    """Everything `densecurate shard` runs with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: SourceSettings = SourceSettings()
    image: ImageSettings = ImageSettings()
    shard_size: int = Field(1000, ge=1)
    workers: int | None = Field(None, ge=1, description="shards processed at once; default: all CPUs")
    ray_address: str | None = None
    repair: bool = Field(False, description="check finished outputs in depth and redo the damaged ones")
    replace: bool = Field(False, description="let this run replace or remove finished outputs of an earlier run")
