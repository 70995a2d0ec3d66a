"""Will a job fit, and with what: the memory planner (``plan``: an adapter setup and a training shape in,
a ``MemoryPlan`` out), its byte formulas, and where a model's parts are placed before it is built."""
