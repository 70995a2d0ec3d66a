"""The adapter layer: one wrapper for every frozen base layer (Linear, 4-bit, 8-bit, MoE experts), and
its training step fused into one autograd function or compiled per decoder layer. The adapters'
initialisations are pure tensor functions in :mod:`qolora.inits`."""
