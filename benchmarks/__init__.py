"""Side-by-side benchmarks of qolora against transformers + PEFT (see benchmarks/README.md)."""
