"""Running a stage: data sources and rows, the shared trainer, checkpoints, run directories, metrics, finiteness."""
