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

    from pipeline.core.ray_cluster import init_ray

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


# The fast lane (`make test`: -m "not slow") holds tests that run in seconds; one that runs longer fails,
# naming its time, so that it gets the `slow` marker instead of slowing every developer's loop. A test counts
# as long when its wall time is over the limit and its own CPU time (its process and the subprocesses it
# waited for) over half of it: on a 2-core machine other processes' load alone can stretch a fast test.
FAST_TEST_LIMIT_S = float(os.environ.get("DENSECURATE_FAST_TEST_LIMIT_S", "5"))


def _fast_lane(config: pytest.Config) -> bool:
    return config.getoption("markexpr", "").replace(" ", "") == "notslow"


CPU_SECONDS = pytest.StashKey[float]()


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    started = _cpu_seconds()
    try:
        return (yield)
    finally:
        item.stash[CPU_SECONDS] = _cpu_seconds() - started


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    busy = item.stash.get(CPU_SECONDS, 0.0) > FAST_TEST_LIMIT_S / 2
    too_long = call.when == "call" and report.passed and call.duration > FAST_TEST_LIMIT_S and busy
    if too_long and _fast_lane(item.config) and item.get_closest_marker("slow") is None:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} took {call.duration:.1f} s, over the fast lane's {FAST_TEST_LIMIT_S:g} s: mark it "
            "@pytest.mark.slow (it still runs in `make test-all` and CI)"
        )
    return report
