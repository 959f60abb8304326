"""The training side of soft-serve: SoFT and its baselines (`soft-train`), the sorted loss,
training data, and per-depth evaluation (`soft-eval`). The runtime (`models.load`, the
dynamic-depth runner) never imports this package."""
