"""Training and evaluation of one phase: the trainer and its parts (epoch, resume, checkpoint, loaders,
distributed set-up), preparing data sets, and evaluating checkpoints."""
