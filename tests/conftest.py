"""Shared fixtures: real photos from scikit-image, a local Ray bound to loopback."""

from __future__ import annotations

import os

# Before anything imports Ray: a local Ray listens on 127.0.0.1 only. No model downloads, ever.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from skimage import data as skdata


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for the tests that run stages in-process."""
    import ray

    from pipeline.ray_cluster import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real RGB photo (512x512 astronaut portrait)."""
    return skdata.astronaut()


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random-weight LLaVA saved like a hub model (``densecurate models make-tiny``)."""
    from captioner.tiny import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("models") / "llava")


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory):
    """A tiny random-weight Qwen2-VL saved like a hub model (``densecurate models make-tiny``)."""
    from captioner.tiny_qwen2_vl import make_tiny_qwen2_vl

    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("models") / "qwen2_vl")


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory):
    """A tiny random-weight Idefics3 (SmolVLM) saved like a hub model (``densecurate models make-tiny``)."""
    from captioner.tiny_idefics3 import make_tiny_idefics3

    return make_tiny_idefics3(tmp_path_factory.mktemp("models") / "idefics3")


@pytest.fixture(scope="session")
def tiny_pixart_dir(tmp_path_factory):
    """A tiny random-weight PixArtAlphaPipeline folder (``densecurate models make-tiny``)."""
    from trainer.tiny import make_tiny_pixart

    return make_tiny_pixart(tmp_path_factory.mktemp("models") / "pixart")


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    """A tiny random-weight DiT folder, the tiny PixArt transformer's sizes (``densecurate models make-tiny``)."""
    from trainer.tiny import make_tiny_dit

    return make_tiny_dit(tmp_path_factory.mktemp("models") / "dit")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random-weight open_clip model folder (``densecurate models make-tiny``: load as ``local-dir:``)."""
    from trainer.tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="session")
def shapes_clip_dir(tmp_path_factory):
    """A tiny open_clip model trained for real on synthetic shapes (see tests/shapes_clip.py), trained once."""
    from tests.shapes_clip import trained_shapes_clip

    return trained_shapes_clip(tmp_path_factory.getbasetemp())
