"""The federated side of the server: everything that talks Flower.

- ``server_app``: the Flower ServerApp (``[tool.flwr.app.components]``)
- ``run``: the federated run (FedAvg rounds, central evaluation, checkpoints, resume, the
  server-distillation-round hook) and its typed :class:`FederationConfig`
- ``strategy``: the strategies and the screening of client replies
- ``rounds``: server distillation rounds (distill from the global model + public subset, save,
  evaluate), shared by the hook, ``simulate --distill`` and the benchmarks

Nothing is imported here, so ``import server.federation.rounds`` does not pull in Flower.
"""
