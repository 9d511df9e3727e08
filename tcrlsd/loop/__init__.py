"""The training loop around the stages: iterations in dvc.yaml, the per-iteration table, reports,
experiments over presets and seeds."""
