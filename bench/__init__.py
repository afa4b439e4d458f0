"""Benchmarks: raw limits, transport, classifier, pipeline and the fer package (`python -m bench`)."""
