"""edgedistill's shared library: datasets, models, augmentation, evaluation, artifacts.

Nothing in here imports Flower, gRPC or the ``server`` package: edge devices and the server
both build on it, and data flows one way (edge -> server).
"""

__version__ = "0.1.0"
