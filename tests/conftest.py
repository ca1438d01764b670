"""Shared test setup: offline hubs, small thread counts (CI has 2 cores)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

import torch  # noqa: E402

# one intra-op thread: at these tiny sizes two threads cost more in synchronisation than they gain
# on a shared 2-core box; subprocess tests set OMP_NUM_THREADS themselves
torch.set_num_threads(1)
pytest_plugins = ["tests.slurm_fixtures", "tests.real_chain"]


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, as study/cluster/run-tests.sh runs it) the tests
    that read the session's micro study run on one worker, so that it is built once, and the Slurm
    tests run one after another, as they would on the one-node cluster anyway."""
    import pytest
    for item in items:
        if "micro_study" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("micro_study"))
        elif item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
