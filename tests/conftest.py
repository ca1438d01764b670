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
