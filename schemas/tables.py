"""Arrow schemas of the Parquet tables densecurate writes."""

from __future__ import annotations

import pyarrow as pa

# Key of the file-level Parquet metadata where a stage stores its fingerprint and stats (JSON).
PARQUET_META_KEY = b"densecurate"

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

# One row per key of a shard's tar (ROOT/captions/NAME/NNNNN.parquet).
CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("captioner", pa.string(), nullable=False),  # NAME
        pa.field("status", pa.string(), nullable=False),  # ok | error
        pa.field("error", pa.string()),
        pa.field("caption", pa.string()),  # after the checks (a truncated caption loses its unfinished sentence)
        pa.field("raw_caption", pa.string()),  # as generated
        pa.field("num_tokens", pa.int32()),  # generated tokens, EOS excluded
        pa.field("finish_reason", pa.string()),  # eos | length
        pa.field("truncated", pa.bool_()),
        pa.field("cut_text", pa.string()),  # what truncation removed
        pa.field("repetition", pa.float32()),  # share of repeated word n-grams
        pa.field("repetitive", pa.bool_()),
        pa.field("empty", pa.bool_()),
        pa.field("seconds", pa.float32()),  # this caption's share of its batch's generate time
        pa.field("model", pa.string()),
        pa.field("revision", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("temperature", pa.float32()),
        pa.field("top_p", pa.float32()),
        pa.field("seed", pa.int64()),
        pa.field("max_new_tokens", pa.int32()),
        pa.field("engine", pa.string()),  # transformers | vllm
        pa.field("device", pa.string()),  # the worker's GPU (its CUDA name) or cpu
        pa.field("gpus", pa.float32()),  # GPUs the worker held (0 on the CPU): GPU-seconds = seconds * gpus
        # Provenance (null in tables written before it was recorded):
        pa.field("model_sha256", pa.string()),  # a local model folder's weights digest (null for a hub id + revision)
        pa.field("prompt_sha256", pa.string()),  # sha256 of the prompt template (before {alt_text} is filled in)
        pa.field("engine_version", pa.string()),  # e.g. "transformers 5.1.0", "vllm 0.32.0"
        pa.field("gpu_seconds", pa.float32()),  # seconds * gpus: 0 on the CPU
        # A merged field's rows only (null for a captioner's own): the field the caption was taken from. There
        # ``seconds`` and ``gpu_seconds`` are what every merged source spent on the key (the cascade's cost).
        pa.field("source", pa.string()),
    ]
)

# One row per scored key of a field (ROOT/density/FIELD/NNNNN.parquet).
DENSITY_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("field", pa.string(), nullable=False),  # alt_text or a captioner name
        pa.field("missing", pa.bool_(), nullable=False),  # no caption (or a blank one): zero nouns
        pa.field("n_tokens", pa.int32(), nullable=False),  # words (spaCy tokens without punctuation)
        pa.field("n_nouns", pa.int32(), nullable=False),
        pa.field("nouns", pa.list_(pa.string()), nullable=False),  # lower-cased lemmas, in order
        pa.field("cut", pa.bool_()),  # longer than max_text_chars: the figures are its first part's
    ]
)

# One row per written sample of the source shard (OUT/NNNNN.parquet of `densecurate curate`):
# status ok = kept in OUT/NNNNN.tar, skipped = removed, with the first rule it failed as reason.
CURATED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("error", pa.string()),
        pa.field("field", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("n_tokens", pa.int32()),
        pa.field("n_nouns", pa.int32()),
        pa.field("n_valid_nouns", pa.int32()),
        pa.field("flagged", pa.bool_()),
        # With grounding rules only (null otherwise): from ROOT/grounding/FIELD and ROOT/duplicates/MODEL.
        pa.field("clip_score", pa.float32()),
        pa.field("n_grounded_nouns", pa.int32()),
        pa.field("grounded_share", pa.float32()),
        pa.field("duplicate_of", pa.string()),  # the kept sample of its cluster, for a duplicate that is not kept
        pa.field("n_captions", pa.int32()),  # with several fields: captions in KEY.captions.json (null otherwise)
    ]
)

# One row per sample of the curated shard (FEATS/NNNNN.parquet of `densecurate features`).
FEATURES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | skipped
        pa.field("reason", pa.string()),
        pa.field("error", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("n_tokens", pa.int32()),  # T5 tokens kept (at most max_tokens)
        pa.field("n_captions", pa.int32()),  # captions encoded (KEY.captions.json; null for one caption)
    ]
)

# One row per written sample of a shard and one CLIP model (ROOT/embeddings/MODEL/NNNNN.parquet).
EMBEDDINGS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # MODEL, the folder name
        pa.field("embedding", pa.list_(pa.float16()), nullable=False),  # L2-normalised image embedding
    ]
)

# One row per scored key of a field (ROOT/grounding/FIELD/NNNNN.parquet); scores are 100 * cosine.
GROUNDING_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("field", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # the CLIP model's folder name under embeddings/
        pa.field("missing", pa.bool_(), nullable=False),  # no caption: no scores, no nouns
        pa.field("n_sentences", pa.int32(), nullable=False),  # sentences scored (at most max_sentences)
        pa.field("clip_score", pa.float32()),  # mean over the sentences (the score curation uses)
        pa.field("clip_score_min", pa.float32()),
        pa.field("clip_score_max", pa.float32()),
        pa.field("clip_score_truncated", pa.float32()),  # the whole caption, cut at the text encoder's context
        pa.field("nouns", pa.list_(pa.string()), nullable=False),  # the density stage's nouns, in order
        pa.field("noun_scores", pa.list_(pa.float32()), nullable=False),  # per noun: image vs the noun's prompts
        pa.field("noun_z", pa.list_(pa.float32()), nullable=False),  # per noun: z against its calibration
        pa.field("grounded", pa.list_(pa.bool_()), nullable=False),  # per noun: z >= z_threshold
        pa.field("n_nouns", pa.int32(), nullable=False),
        pa.field("n_grounded_nouns", pa.int32(), nullable=False),
        pa.field("grounded_share", pa.float32()),  # n_grounded_nouns / n_nouns (null without nouns)
        pa.field("ungrounded_nouns", pa.list_(pa.string()), nullable=False),  # distinct, in caption order
    ]
)

# One row per noun of a field's vocabulary (ROOT/calibration/FIELD.parquet): how the noun's prompts score
# on reference images whose captions do not name it (negatives) and on those that do (positives).
CALIBRATION_SCHEMA = pa.schema(
    [
        pa.field("noun", pa.string(), nullable=False),
        pa.field("field", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("n_negatives", pa.int32(), nullable=False),
        pa.field("n_positives", pa.int32(), nullable=False),
        pa.field("negative_mean", pa.float32(), nullable=False),  # 100 * cosine
        pa.field("negative_std", pa.float32(), nullable=False),
        pa.field("positive_mean", pa.float32()),  # null without positives
        pa.field("fallback", pa.bool_(), nullable=False),  # too few negatives: the pooled statistics are used
        pa.field("mean", pa.float32(), nullable=False),  # what z is computed against
        pa.field("std", pa.float32(), nullable=False),
        pa.field("text_embedding", pa.list_(pa.float16()), nullable=False),  # the prompt ensemble's embedding
    ]
)

# One row per member of a duplicate cluster of >= 2 samples (ROOT/duplicates/MODEL.parquet).
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # MODEL, whose embeddings found the cluster
        pa.field("cluster", pa.string(), nullable=False),  # the kept sample's key
        pa.field("kept", pa.bool_(), nullable=False),  # one per cluster: the smallest key
        pa.field("kind", pa.string()),  # exact (same sha256 as the kept sample) | semantic; null for the kept one
        pa.field("similarity", pa.float32(), nullable=False),  # cosine to the kept sample's embedding
    ]
)

# ROOT/vocab/FIELD.parquet (written by DuckDB in the score stage): every noun of a field and its count.
VOCAB_SCHEMA = pa.schema(
    [
        ("noun", pa.string()),
        ("count", pa.int64()),
        ("valid", pa.bool_()),
        ("min_count", pa.int32()),
        ("field", pa.string()),
    ]
)

# ROOT/history/STARTED-COMMAND-PID.parquet: one row per stage run over the root (the catalog's ``runs``).
RUNS_SCHEMA = pa.schema(
    [
        pa.field("command", pa.string(), nullable=False),  # the stage: shard, caption, score, ...
        pa.field("name", pa.string()),  # the output it wrote: a captioner, a field, a folder
        pa.field("settings_fingerprint", pa.string()),  # sha256 of the run's settings
        pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("ended_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("shards", pa.int64(), nullable=False),  # planned
        pa.field("shards_reused", pa.int64(), nullable=False),  # found done
        pa.field("records", pa.int64(), nullable=False),  # rows the shards it wrote hold
        pa.field("written", pa.int64(), nullable=False),  # of them, written (not skipped)
        pa.field("workers", pa.int64(), nullable=False),
        pa.field("device", pa.string()),
        pa.field("worker_seconds", pa.float64(), nullable=False),  # wall seconds times workers
        pa.field("gpu_seconds", pa.float64(), nullable=False),  # wall seconds times the GPUs held (0 on CPUs)
        pa.field("host", pa.string()),
    ]
)
