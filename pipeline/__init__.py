"""xmodel: activation communication between two language models, as a staged, cached pipeline."""

__version__ = "0.1.0"
