"""Ray for the stages: connect or start a local Ray on loopback, and start model-holding actors."""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline.stage import Actors

# Read by Ray when it is imported: with it off, a local Ray takes 127.0.0.1 as its node address and
# every Ray service listens on loopback only (Ray's default is the machine's external address).
RAY_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS`` (a cluster; set inside Ray jobs), or start a local Ray
    bound to 127.0.0.1; no-op if connected."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault(RAY_LOOPBACK_SWITCH, "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def cluster_cpus() -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def start_actors(pool: Actors, count_cap: int) -> tuple[list[Any], str]:
    """Start the pool's actors (at most ``count_cap``): GPU actors when the cluster has GPUs and the
    pool wants them, else CPU actors. Actors restart when they die and retry the call they were
    running. Returns them and the device kind (``cuda`` or ``cpu``)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    kwargs: dict[str, Any] = {}
    if gpus and pool.gpus_per_worker > 0 and pool.device != "cpu":
        count = pool.workers or max(1, int(gpus // pool.gpus_per_worker))
        resources: dict[str, Any] = {"num_gpus": pool.gpus_per_worker, "num_cpus": 1}
        kind = "cuda"
    elif pool.one_per_core:
        count = pool.workers or cluster_cpus()
        resources, kind = {"num_cpus": 1}, "cpu"
    else:
        count = pool.workers or 1
        threads = max(1, cluster_cpus() // count)
        resources, kind, kwargs = {"num_cpus": threads}, "cpu", {"cpu_threads": threads}
    if pool.runtime_env:
        resources["runtime_env"] = pool.runtime_env
    remote_cls = ray.remote(max_restarts=2, max_task_retries=2)(pool.cls)
    count = max(1, min(count, count_cap))
    return [remote_cls.options(**resources).remote(*pool.args, **kwargs) for _ in range(count)], kind
