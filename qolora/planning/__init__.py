"""Will a job fit, and with what: the memory planner, its byte formulas, and where a model's parts
are placed before it is built."""
