"""Entry points: one module per job, run as `python -m jobs.<name> --config ray_config.yaml`."""
