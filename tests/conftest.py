import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs ~4 s)."""
    import ray

    from safedpo_ray.config.training import RunConfig
    from safedpo_ray.runtime.ray_env import ensure_ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    # The fake credentials of the tests' S3 store (tests/s3_server.py), for Ray's workers too.
    from s3_server import CREDENTIALS

    for k, v in CREDENTIALS.items():
        os.environ.setdefault(k, v)
    ensure_ray(RunConfig(num_workers=2, local_num_cpus=4))
    yield ray
    ray.shutdown()
