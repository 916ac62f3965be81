"""The training run: the Trainer and its callbacks, processes and backends, precision, time budget, checkpoints."""
