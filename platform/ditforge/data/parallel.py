"""Where ingest and encode run their Ray tasks.

- Already inside Ray (a Ray job, a test fixture): use it.
- `RAY_ADDRESS` set: attach to that cluster, shipping this checkout's package to its workers.
- Otherwise: a private Ray in this process, with this machine's CPUs (and GPUs), shut down when
  the command ends. Data preparation then never waits behind training jobs holding the embedded
  head's CPU slots, and never changes that head's state. If that Ray cannot start, the caller's
  `fallback` names a head to use instead (the CLI passes `services.running_ray`: the embedded
  head, when it is up). The data layer itself knows nothing of the services.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

from .. import credentials

# Env the workers need to reach storage the same way the driver does. S3 keys are not shipped
# (runtime_env is visible in the dashboard): a remote cluster gets them from its own environment.
_PASS_ENV = (
    "DITFORGE_HOME",
    "DITFORGE_S3_CREDENTIALS",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_PROFILE",
    "DITFORGE_S3_PROFILE",
)


@contextmanager
def ray_session(num_cpus: int | None = None, fallback: Callable[[], str | None] | None = None) -> Iterator[None]:
    """Ray for the block: the one already initialised, else as the module says. Nested sessions
    reuse the outer one, so a command that ingests and encodes starts one Ray, not two."""
    if ray.is_initialized():
        yield
        return
    # Token auth, like every Ray of ours (its ports listen beyond loopback): the private Ray
    # uses the same token as the embedded head, so either can be attached to.
    credentials.use_ray_token(create=True)
    env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _attach(address, env)
    else:
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env},
                configure_logging=False,
            )
        except Exception:
            # A private Ray must register within a fixed 30 s, which an overloaded machine can
            # miss; the embedded head, when it is up, has long started.
            ray.shutdown()
            head = fallback() if fallback else None
            if head is None:
                raise
            _attach(head, env)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress bar says enough
    try:
        yield
    finally:
        ray.shutdown()


def _attach(address: str, env: dict) -> None:
    pkg = str(Path(__file__).resolve().parents[1])  # this checkout's package, not the cluster's
    ray.init(address=address, runtime_env={"py_modules": [pkg], "env_vars": env}, log_to_driver=False)


def cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))
