"""evomerge: evolve LLM merge recipes (parameter space and layer stacking) and export them as mergekit YAML."""

__version__ = "0.1.0"
