"""Benchmarks: commands, not timed tests. ``attnkit bench <name>`` runs ``attnkit.apps.bench.<module>``."""
