"""The distillation job service (issue 16): gRPC API in ``v1/`` generated from ``protos/``."""
