"""Where the bytes live while training: the frozen base streamed from host memory, gradient
checkpointing (its inputs optionally offloaded), the input embedding on the host, the loss without
full logits, freed heap handed back to the operating system."""
