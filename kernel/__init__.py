"""The kernel: config, run assembly, the step loop, model/data loading, tuners, checkpoints, CLI."""
