"""The model-agnostic trainer: `train(config, workdir)`, the step, checkpoints, optimizer,
sharding, metrics and the preflight checks. It knows pipelines and a task protocol, never a
model family."""
