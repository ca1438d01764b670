"""Shared test setup: offline hubs, small thread counts (CI has 2 cores)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
pytest_plugins = ["tests.slurm_fixtures"]
