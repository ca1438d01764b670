"""Dev/CI cluster helpers: single-node Slurm scripts (slurm-up.sh / slurm-down.sh) and a local MLflow server."""
