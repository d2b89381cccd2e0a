"""Framework adapters (torch, CuPy) that connect the core to a model's layers.

Each adapter is a subpackage imported explicitly (``curvlin.adapters.torch``), so importing
curvlin never imports a framework.
"""
