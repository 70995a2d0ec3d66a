"""A qolora model: built from a base in one pass (``prepare``), saved as an adapter folder, rebuilt
exactly from it (``load``), the record it carries, and its life inside Trainer, TRL and PEFT."""
