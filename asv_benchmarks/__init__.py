"""asv benchmarks for curvlin; see ``common.py`` for the backend parametrisation."""
