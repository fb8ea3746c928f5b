"""Arrow schemas of the Parquet tables densecurate writes."""

from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"

# One row per *input* record of a shard, written or not (ROOT/shards/NNNNN.parquet).
SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | skipped
        pa.field("reason", pa.string()),  # short skip code (null when ok), e.g. too_small
        pa.field("error", pa.string()),  # human-readable skip reason (null when ok)
        pa.field("source", pa.string(), nullable=False),
        pa.field("original_id", pa.string(), nullable=False),
        pa.field("location", pa.string(), nullable=False),  # file path, or TAR::MEMBER
        pa.field("alt_text", pa.string()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("jpeg_bytes", pa.int64()),
        pa.field("sha256", pa.string()),  # of the stored JPEG bytes
        pa.field("meta_json", pa.string()),  # the source's own metadata, as JSON
    ]
)
