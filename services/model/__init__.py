"""The model: its registry, the preprocessing of a face crop, the runtimes that run it and
the inference copy they serve.

Shared by training and serving, so a model is trained, scored and served through the same
preprocessing and the same runtimes: ``training/`` imports this package, never the
classifier service.
"""
