"""The distillation methods: one registry, one module per method family.

``registry`` knows no method. Importing this package imports every built-in method module, and
each registers itself with ``@register_method``; so ``get_method(name)`` sees them all however
the registry is reached (Python imports this package before any of its modules).

- ``registry``: :class:`DistillTask`, ``register_method`` / ``get_method`` / ``list_methods``,
  :func:`distill` (the one entry point of the CLI, the ServerApp and the job service)
- ``pixel_loop``: the pixel-optimisation loop shared by DM, DSV and DM+DKKT
- ``coreset``: random, herding, k-center
- ``dm``: Distribution Matching
- ``dkkt`` (the loss) + ``dsv`` (dsv, dm+dkkt, dsv-dm-avg): Deep Support Vectors
- ``gan`` (networks, sampling, the generator artifact) + ``generator`` (the method)
"""

from server.methods import coreset, dm, dsv, generator  # noqa: F401  (registers the built-in methods)
from server.methods.registry import (
    DistillTask,
    MethodOutput,
    MethodSpec,
    distill,
    get_method,
    list_methods,
    make_task,
    register_method,
)

__all__ = [
    "DistillTask",
    "MethodOutput",
    "MethodSpec",
    "distill",
    "get_method",
    "list_methods",
    "make_task",
    "register_method",
]
