"""Training, evaluation and model-registry commands: ``python -m training --help``."""
