"""Settings of the caption stage and of caption generation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from schemas.validation import SETTINGS, Device, SimpleName

DType = Literal["auto", "bfloat16", "float16", "float32"]


class GenerationSettings(BaseModel):
    """How captions are generated; recorded with every caption."""

    model_config = SETTINGS

    prompt: str = Field("pixart", min_length=1, description="pixart | pixart-alt | free text with {alt_text}")
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy decoding; above 0 samples")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, description="sampling seed (each batch is seeded from it and its first key)")
    ignore_eos: bool = Field(False, description="always generate max_new_tokens (benchmarks)")
    repetition_ngram: int = Field(3, ge=1, description="n of the n-grams the repetition check counts")
    repetition_threshold: float = Field(
        0.3, gt=0.0, le=1.0, description="share of repeated n-grams above which a caption is flagged"
    )

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


class ModelSettings(BaseModel):
    """Which model to load and how."""

    model_config = SETTINGS

    model: str = Field(..., min_length=1, description="hub id or local directory")
    revision: str | None = None
    dtype: DType = "auto"
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = False
    max_image_pixels: int | None = Field(
        None,
        ge=28 * 28,
        description="images larger than this many pixels are downscaled (aspect kept) before the processor sees "
        "them; None: the family's default (451,584 = 576 tokens of 28x28 for qwen2_vl / qwen2_5_vl, no cap for others)",
    )


Engine = Literal["transformers", "vllm"]


class VllmSettings(BaseModel):
    """What users tune in the vLLM engine (``--engine vllm``)."""

    model_config = SETTINGS

    max_num_seqs: int = Field(256, ge=1, description="sequences the scheduler runs at once")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="share of GPU memory vLLM may take")
    max_model_len: int | None = Field(None, ge=16, description="prompt + caption tokens (default: the model's)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model replica spans (13B+ models)")
    python: str | None = Field(
        None, description="interpreter of the vLLM environment (default: .venv-vllm/bin/python of the project)"
    )
    cpu_kv_cache_gib: int = Field(1, ge=1, description="KV cache on CPU-only machines (VLLM_CPU_KVCACHE_SPACE)")
    load_format: Literal["auto", "dummy"] = Field("auto", description="dummy: random weights (benchmarks only)")

    def engine_settings(self) -> str:
        """What changes the captions (for the fingerprint): not the interpreter's path."""
        return self.model_dump_json(exclude={"python", "cpu_kv_cache_gib"})


class CaptionConfig(BaseModel):
    """Everything `densecurate caption` runs with."""

    model_config = SETTINGS

    name: SimpleName = Field(..., description="captioner name: ROOT/captions/NAME/ (letters, digits, -, _, .)")
    model: ModelSettings
    generation: GenerationSettings = GenerationSettings()
    workers: int | None = Field(None, ge=1, description="model replicas (default: one per GPU, or 1 on CPU)")
    gpus_per_worker: float = Field(1.0, ge=0.0)
    ray_address: str | None = None
    repair: bool = Field(False, description="check finished outputs in depth and redo the damaged ones")
    replace: bool = Field(False, description="let this run replace captions an earlier run of this name made otherwise")
    engine: Engine = Field("transformers", description="transformers (static batches) or vllm (continuous batching)")
    vllm: VllmSettings = VllmSettings()
    sample: float | None = Field(
        None,
        gt=0,
        description="caption a sample of each shard: N keys (N >= 1, whole) or a fraction (below 1); None: every key",
    )
    sample_seed: int = Field(0, ge=0, description="which keys the sample takes (the same for every model)")
    keys_query: str | None = Field(
        None,
        min_length=1,
        description="caption only the keys a read-only DuckDB query over the catalog's views returns (its `key` "
        "column), e.g. SELECT key FROM grounding WHERE field = 'cheap' AND grounded_share < 0.6; with sample, a "
        "sample of those keys",
    )

    @model_validator(mode="after")
    def _sample_is_a_count_or_a_fraction(self) -> CaptionConfig:
        if self.sample is not None and self.sample >= 1 and not float(self.sample).is_integer():
            raise ValueError(f"sample {self.sample} is neither a whole number of keys nor a fraction below 1")
        return self

    @model_validator(mode="after")
    def _tensor_parallel_fits_the_worker(self) -> CaptionConfig:
        tp = self.vllm.tensor_parallel_size
        if self.engine == "vllm" and tp > 1 and self.gpus_per_worker != tp:
            raise ValueError(f"vllm.tensor_parallel_size {tp} needs gpus_per_worker {tp} (--gpus-per-worker {tp})")
        return self

    def fingerprint_settings(self) -> str:
        """The settings a caption file's fingerprint covers: model, generation, and a non-default engine's."""
        unset = {"max_image_pixels"} if self.model.max_image_pixels is None else None  # older fingerprints stay valid
        settings = self.model.model_dump_json(exclude=unset) + self.generation.model_dump_json()
        if self.engine != "transformers":
            settings += self.engine + self.vllm.engine_settings()
        return settings

    def sample_settings(self) -> str:
        """What a sample run adds to the fingerprint (empty for a full run)."""
        return "" if self.sample is None else f"sample={self.sample:g};seed={self.sample_seed}"

    @property
    def chooses_keys(self) -> bool:
        """Whether the run captions some keys of each shard only (a sample or a keys query)."""
        return self.sample is not None or self.keys_query is not None
