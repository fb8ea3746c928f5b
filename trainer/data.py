"""Training data as a deterministic, resumable stream: feature shards, or curated shards encoded online.

Samples are indexed once (tar member offsets); epoch ``e`` visits them in a permutation seeded by
``(seed, e)``; global sample ``p`` of the run gets its own random generators seeded by ``(seed, p)``: one
for the fresh latent draw and the caption dropout, one for the caption drawn among a sample's several
captions (``KEY.captions.json``, by ``data.caption_sampling``). So the batch of step ``s`` is a pure function
of the config and ``s``: any number of loader processes, or a resume at ``s``, sees exactly the same data.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset, Sampler

from schemas.errors import MissingInputError
from trainer.errors import CorruptFeatureError
from trainer.features import FEATURE_EXT, NULL_CAPTION_FILE, Features, image_tensor

# What a user does about a damaged or non-finite feature file.
REENCODE_HINT = "re-encode that shard (delete it, then rerun densecurate features) or drop the sample from the data"


@dataclass(frozen=True)
class SampleRef:
    """One sample of a tar: its key and the byte range of each member it needs."""

    tar: str
    key: str
    spans: tuple[tuple[str, int, int], ...]  # (extension, offset, size)

    @property
    def shard(self) -> str:
        """The tar's file name (the key is unique within it)."""
        return Path(self.tar).name

    def read(self, ext: str) -> bytes | None:
        for name, offset, size in self.spans:
            if name == ext:
                with open(self.tar, "rb") as handle:
                    handle.seek(offset)
                    return handle.read(size)
        return None


def index_samples(folder: Path, required: str) -> list[SampleRef]:
    """Every sample of the folder's tars that has a ``required`` member, in a stable order."""
    refs = []
    for tar in sorted(folder.glob("*.tar")):
        members: dict[str, list[tuple[str, int, int]]] = {}
        with tarfile.open(tar, mode="r:") as tf:
            for member in tf:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    members.setdefault(key, []).append((ext, member.offset_data, member.size))
        refs += [SampleRef(str(tar), k, tuple(v)) for k, v in members.items() if any(e == required for e, *_ in v)]
    if not refs:
        raise MissingInputError(f"no samples with a .{required} member in {folder}")
    return refs


# A sample's several captions with their scores (`densecurate curate --field a --field b`).
CAPTIONS_EXT = "captions.json"
CAPTION_STREAM = 3  # the stream id of a position's caption draw (1: the epoch order, 2: noise and dropout)


@dataclass(frozen=True)
class CaptionSampling:
    """How one of a sample's several captions is drawn: ``first``, ``uniform`` or ``weighted`` by ``weight``
    (a score of ``KEY.captions.json``) at ``temperature``."""

    mode: str = "first"
    weight: str = "grounded_nouns"
    temperature: float = 1.0

    def probabilities(self, captions: list[dict[str, Any]]) -> torch.Tensor:
        """The chance of drawing each caption: softmax(score / temperature) when weighted, a caption without the
        score never drawn (unless none has it: then uniform)."""
        n = len(captions)
        if self.mode == "first" or n == 1:
            return torch.eye(n, dtype=torch.float64)[0]
        scores = [c.get(self.weight) for c in captions]
        if self.mode == "uniform" or all(s is None for s in scores):
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        logits = torch.tensor(
            [float("-inf") if s is None else s / self.temperature for s in scores], dtype=torch.float64
        )
        return torch.softmax(logits, dim=0)


def seeded_generator(*parts: int) -> torch.Generator:
    """A generator seeded by a hash of ``parts`` (e.g. seed, position, stream id): one stream per purpose."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63)
    return torch.Generator().manual_seed(seed)


class _StepOrdered(Dataset):
    """Maps the run's global sample counter to a sample (a fresh permutation every epoch)."""

    def __init__(
        self, refs: list[SampleRef], seed: int, caption_dropout: float, sampling: CaptionSampling | None = None
    ) -> None:
        self.refs, self.seed, self.caption_dropout = refs, seed, caption_dropout
        self.sampling = sampling or CaptionSampling()
        self._order: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def ref_at(self, position: int) -> SampleRef:
        epoch, offset = divmod(position, len(self.refs))
        if epoch not in self._order:
            self._order = {epoch: torch.randperm(len(self.refs), generator=seeded_generator(self.seed, epoch, 1))}
        return self.refs[int(self._order[epoch][offset])]

    def draws(self, position: int, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
        """This sample's latent noise and whether its caption is dropped."""
        gen = seeded_generator(self.seed, position, 2)
        noise = torch.randn(latent_shape, generator=gen)
        return noise, torch.rand((), generator=gen).item() < self.caption_dropout

    def caption_index(self, position: int, captions: list[dict[str, Any]]) -> int:
        """Which of the sample's captions this position trains on (its own seeded draw; 0 with one caption)."""
        if len(captions) <= 1 or self.sampling.mode == "first":
            return 0
        probabilities = self.sampling.probabilities(captions)
        return int(torch.multinomial(probabilities, 1, generator=seeded_generator(self.seed, position, CAPTION_STREAM)))


def read_captions(ref: SampleRef) -> list[dict[str, Any]]:
    """The sample's captions with their scores (``KEY.captions.json``), or none."""
    data = ref.read(CAPTIONS_EXT)
    return json.loads(data) if data else []


def read_features(ref: SampleRef) -> Features:
    """The sample's features, checked: a ``CorruptFeatureError`` naming the key and shard when the file does
    not parse or holds NaN or infinite values (which would make every loss of its batches NaN)."""
    where = f"feature file {ref.key}.{FEATURE_EXT} in shard {ref.tar}"
    try:
        feats = Features.from_bytes(ref.read(FEATURE_EXT))
    except Exception as exc:  # safetensors raises its own error types for a damaged header or data
        raise CorruptFeatureError(f"{where} does not load ({type(exc).__name__}): {REENCODE_HINT}") from None
    bad = feats.nonfinite()
    if bad:
        raise CorruptFeatureError(f"{where} holds NaN or infinite values in {' and '.join(bad)}: {REENCODE_HINT}")
    return feats


def _captions_of(ref: SampleRef, feats: Features) -> list[dict[str, Any]]:
    """The captions of a sample with several, checked to match its stored states (``t5``, ``t5_1``, ...)."""
    captions = read_captions(ref)
    if len(captions) != 1 + len(feats.extra_t5):
        raise CorruptFeatureError(
            f"sample {ref.key} in shard {ref.tar} lists {len(captions)} captions in its {CAPTIONS_EXT} but its "
            f"{FEATURE_EXT} holds the states of {1 + len(feats.extra_t5)}: {REENCODE_HINT}"
        )
    return captions


class FeatureDataset(_StepOrdered):
    """Position -> latent (drawn from the stored posterior), padded T5 states, mask, and the sample's key and
    shard (so that a failed step can name its samples). Feature files are checked finite when read."""

    def __init__(
        self,
        folder: Path,
        *,
        seed: int,
        max_tokens: int,
        scaling_factor: float,
        caption_dropout: float,
        sampling: CaptionSampling | None = None,
    ) -> None:
        super().__init__(index_samples(folder, FEATURE_EXT), seed, caption_dropout, sampling)
        self.null_t5 = load_file(str(folder / NULL_CAPTION_FILE))["t5"]
        if not bool(torch.isfinite(self.null_t5).all()):
            raise CorruptFeatureError(
                f"{folder / NULL_CAPTION_FILE} holds NaN or infinite values: delete it and rerun densecurate features"
            )
        self.max_tokens, self.scaling_factor = max_tokens, scaling_factor

    def __getitem__(self, position: int) -> dict[str, torch.Tensor | str]:
        ref = self.ref_at(position)
        feats = read_features(ref)
        mean, std = feats.vae.float().chunk(2, dim=0)
        noise, dropped = self.draws(position, tuple(mean.shape))
        latent = (mean + std * noise) * self.scaling_factor
        chosen = self.caption_index(position, _captions_of(ref, feats)) if feats.extra_t5 else 0
        t5 = (self.null_t5 if dropped else feats.caption_states(chosen))[: self.max_tokens].float()
        padded = torch.zeros(self.max_tokens, t5.shape[1])
        padded[: t5.shape[0]] = t5
        mask = torch.zeros(self.max_tokens, dtype=torch.long)
        mask[: t5.shape[0]] = 1
        return {
            "latent": latent,
            "t5": padded,
            "mask": mask,
            "key": ref.key,
            "shard": ref.shard,
            "caption_index": chosen,
        }


class CuratedDataset(_StepOrdered):
    """Position -> image tensor, caption ("" when dropped), latent noise (for encoders run in the loop), key, shard."""

    def __init__(
        self,
        folder: Path,
        *,
        seed: int,
        resolution: int,
        caption_dropout: float,
        sampling: CaptionSampling | None = None,
    ) -> None:
        super().__init__(index_samples(folder, "jpg"), seed, caption_dropout, sampling)
        self.resolution = resolution

    def __getitem__(self, position: int) -> dict[str, object]:
        ref = self.ref_at(position)
        latent_side = self.resolution // 8
        noise, dropped = self.draws(position, (4, latent_side, latent_side))
        captions = read_captions(ref)
        chosen = self.caption_index(position, captions)
        text = captions[chosen]["text"] if captions else (ref.read("txt") or b"").decode()
        caption = "" if dropped else text
        image = image_tensor(ref.read("jpg"), self.resolution)
        return {
            "image": image,
            "caption": caption,
            "noise": noise,
            "key": ref.key,
            "shard": ref.shard,
            "caption_index": chosen,
        }


class StepBatches(Sampler[list[int]]):
    """Batches of global sample positions for steps ``start..stop``; worker ``rank`` of ``world`` takes its slice."""

    def __init__(self, *, start: int, stop: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.start, self.stop, self.batch_size, self.rank, self.world = start, stop, batch_size, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.batch_size * self.world
        for step in range(self.start, self.stop):
            first = step * per_step + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))
