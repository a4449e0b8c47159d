"""Experiments: the configuration, the runner behind the CLI, the demo and provenance."""
