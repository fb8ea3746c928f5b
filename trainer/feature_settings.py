"""What feature shards were made with, and the check that training uses features made as its config says.

The features stage records its settings (``FeatureSettings``) in each shard's stats file and in each sample's
JSON, under ``SETTINGS_KEY``. Before training on feature shards, ``require_matching_features`` compares
every shard's record with the training config (resolution, the pipeline's VAE and text encoder,
``data.max_tokens``) and refuses a mismatch in one sentence naming both values.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from schemas.layout import STATS_SUFFIX
from schemas.train_config import TrainConfig
from trainer.errors import FeatureMismatchError

SETTINGS_KEY = "features"
RECORDED = frozenset({"vae", "text_encoder", "resolution"})  # in every record; max_tokens is absent from older ones

# Per compared setting: its name in the message, the training config's field, the features stage's option.
COMPARED = {
    "resolution": ("resolution", "resolution", "--resolution"),
    "vae": ("VAE", "pipeline", "--vae"),
    "text_encoder": ("text encoder", "pipeline", "--text-encoder"),
    "max_tokens": ("T5 max length", "data.max_tokens", "--max-tokens"),
}


def model_identity(source: str, subfolder: str) -> str:
    """The model a hub id or folder loads, however it is spelled: a local folder's absolute path (its
    ``subfolder`` when it has one, as ``from_pretrained_component`` loads it), else the hub id."""
    local = Path(source).expanduser()
    if not local.is_dir():
        return source
    return str((local / subfolder if (local / subfolder).is_dir() else local).resolve())


@dataclass(frozen=True)
class FeatureSettings:
    """The settings that decide what a feature holds; the models as ``model_identity`` names them."""

    vae: str
    text_encoder: str
    resolution: int
    max_tokens: int | None  # None: not recorded (shards written before it was)

    @classmethod
    def of(cls, vae: str, text_encoder: str, resolution: int, max_tokens: int | None) -> FeatureSettings:
        return cls(model_identity(vae, "vae"), model_identity(text_encoder, "text_encoder"), resolution, max_tokens)

    @classmethod
    def of_training(cls, config: TrainConfig) -> FeatureSettings:
        """What the training config expects: its resolution, its pipeline's encoders, its T5 max length."""
        return cls.of(config.pipeline, config.pipeline, config.resolution, config.data.max_tokens)

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, wanted: FeatureSettings) -> list[str]:
        """The recorded settings that differ from ``wanted``."""
        made = self.record()
        return [name for name in COMPARED if made[name] is not None and made[name] != getattr(wanted, name)]


def _record_in(text: str | bytes) -> dict[str, Any] | None:
    """The settings recorded in a stats or sample JSON text, if it holds them."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    record = data.get(SETTINGS_KEY) if isinstance(data, dict) else None
    return record if isinstance(record, dict) and record.keys() >= RECORDED else None


def _first_sample_json(tar: Path) -> bytes:
    """The shard's first sample JSON (b"" when it has none or cannot be read)."""
    try:
        with tarfile.open(tar, mode="r:") as tf:
            member = next((m for m in tf if m.isfile() and m.name.endswith(".json")), None)
            handle = tf.extractfile(member) if member is not None else None
            return handle.read() if handle is not None else b""
    except (OSError, tarfile.TarError):
        return b""


def recorded_settings(tar: Path) -> FeatureSettings | None:
    """What made a feature shard, from its stats file or else (shards written before the stats kept it) its
    first sample's JSON; None when neither records it."""
    stats = tar.with_name(tar.stem + STATS_SUFFIX)
    record = (_record_in(stats.read_text()) if stats.is_file() else None) or _record_in(_first_sample_json(tar))
    if record is None:
        return None
    return FeatureSettings.of(record["vae"], record["text_encoder"], record["resolution"], record.get("max_tokens"))


def mismatch_message(tar: Path, made: FeatureSettings, wanted: FeatureSettings, pipeline: str) -> str:
    """One sentence: what the shard was made with, what the config has, and the two ways out."""
    names = made.differences(wanted)

    def listed(settings: FeatureSettings) -> str:
        return " and ".join(f"{COMPARED[n][0]} {getattr(settings, n)}" for n in names)

    options = " ".join(
        f"{COMPARED[n][2]} {pipeline if n in ('vae', 'text_encoder') else getattr(wanted, n)}" for n in names
    )
    fields = " and ".join(dict.fromkeys(COMPARED[n][1] for n in names))
    return (
        f"the feature shard {tar} was made with {listed(made)} but the training config has {listed(wanted)}; "
        f"make the features again with {options} (densecurate features, into another folder) or change {fields} "
        "in the training config"
    )


def require_matching_features(config: TrainConfig) -> None:
    """Refuse feature shards whose recorded settings differ from the training config (``FeatureMismatchError``)."""
    if config.data.source != "features":
        return
    wanted = FeatureSettings.of_training(config)
    for tar in sorted(Path(config.data.features).glob("*.tar")):
        made = recorded_settings(tar)
        if made is not None and made.differences(wanted):
            raise FeatureMismatchError(mismatch_message(tar, made, wanted, config.pipeline))
