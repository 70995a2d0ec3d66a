"""Training a prepared model: the run's options, the loop and its numerics (optimizer, schedule), the
data order, the run folder and its checkpoints, reports, multi-process training (DDP, FSDP), and
``finetune``, the whole job in one call."""
