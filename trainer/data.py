"""Feature shards as a deterministic, resumable training stream.

Samples are indexed once (tar member offsets); epoch ``e`` visits them in a permutation seeded by
``(seed, e)``; global sample ``p`` of the run gets its own random generator seeded by ``(seed, p)`` for
the fresh latent draw and the caption dropout. So the batch of step ``s`` is a pure function of the
config and ``s``: any number of loader processes, or a resume at ``s``, sees exactly the same data.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset, Sampler

from trainer.features import FEATURE_EXT, NULL_CAPTION_FILE, Features


@dataclass(frozen=True)
class FeatureRef:
    """Where one sample's features are: a tar and the member's byte range."""

    tar: str
    offset: int
    size: int
    key: str


def index_features(folder: Path) -> list[FeatureRef]:
    """Every ``KEY.feat.safetensors`` member of the folder's tars, in a stable order."""
    refs = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar, mode="r:") as tf:
            for member in tf:
                key, _, ext = member.name.partition(".")
                if ext == FEATURE_EXT and member.isfile():
                    refs.append(FeatureRef(str(tar), member.offset_data, member.size, key))
    if not refs:
        raise FileNotFoundError(f"no feature shards in {folder}: run `densecurate features` first")
    return refs


def seeded_generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63)
    return torch.Generator().manual_seed(seed)


class FeatureDataset(Dataset):
    """Item ``position`` (the run's global sample counter) -> latent, T5 states, mask."""

    def __init__(
        self, folder: Path, *, seed: int, max_tokens: int, scaling_factor: float, caption_dropout: float
    ) -> None:
        self.refs = index_features(folder)
        self.null_t5 = load_file(str(folder / NULL_CAPTION_FILE))["t5"]
        self.seed, self.max_tokens = seed, max_tokens
        self.scaling_factor, self.caption_dropout = scaling_factor, caption_dropout
        self._order: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def ref_at(self, position: int) -> FeatureRef:
        epoch, offset = divmod(position, len(self.refs))
        if epoch not in self._order:
            self._order = {epoch: torch.randperm(len(self.refs), generator=seeded_generator(self.seed, epoch, 1))}
        return self.refs[int(self._order[epoch][offset])]

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        ref = self.ref_at(position)
        with open(ref.tar, "rb") as handle:
            handle.seek(ref.offset)
            feats = Features.from_bytes(handle.read(ref.size))
        gen = seeded_generator(self.seed, position, 2)
        mean, std = feats.vae.float().chunk(2, dim=0)
        latent = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scaling_factor
        t5 = self.null_t5 if torch.rand((), generator=gen).item() < self.caption_dropout else feats.t5
        t5 = t5[: self.max_tokens].float()
        padded = torch.zeros(self.max_tokens, t5.shape[1])
        padded[: t5.shape[0]] = t5
        mask = torch.zeros(self.max_tokens, dtype=torch.long)
        mask[: t5.shape[0]] = 1
        return {"latent": latent, "t5": padded, "mask": mask}


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
