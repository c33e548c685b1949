"""refinery: distil an LLM system's execution traces into trustworthy training data."""

__version__ = "0.1.0"
