"""The server: aggregation of edge models and the distillation methods that run on it."""
