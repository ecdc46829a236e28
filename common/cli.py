"""The ``edgedistill`` console script: a dispatcher that imports a subcommand only when it runs.

``--help`` stays fast, and a device that runs only the edge client never imports server code.
Subcommand modules expose ``<name>_arguments(parser, argv)`` and ``<name>_main(args) -> int``.
Errors the user can fix (:class:`EdgeDistillError`) print one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help); modules are imported lazily
COMMANDS: dict[str, tuple[str, str]] = {
    "distill": ("server.commands", "distill a synthetic training set with a registered method"),
    "generate": ("server.commands", "sample a distilled set of any ipc / per-class counts from a trained generator"),
    "allocate": ("server.commands", "class-adaptive images per class: K-means diversity of each class -> counts"),
    "evaluate": ("common.commands", "train fresh networks on an artifact and test on real data"),
    "train": ("common.commands", "train a model centrally (a global model for the DKKT methods)"),
    "simulate": ("simulations.simulate", "run a simulated edge fleet (Flower + Ray): FedAvg + server rounds"),
    "datasets": ("common.commands", "list datasets and whether their files are available locally"),
    "certs": ("edge_client.certs", "create a TEST CA, SuperLink TLS certificate and SuperNode auth keys"),
    "fleet-gateway": ("server.federation.gateway", "TLS proxy that lets devices reach the Fleet API and nothing else"),
    "serve": ("server.service.serve", "the distillation job service (gRPC): durable jobs, local or Ray workers"),
    "jobs": ("server.service.client", "client of the job service: submit | list | watch | cancel | fetch"),
}


def _usage() -> str:
    from common import __version__

    width = max(map(len, COMMANDS))
    lines = [
        f"edgedistill {__version__}: federated edge-to-server dataset distillation",
        "",
        "usage: edgedistill COMMAND [options]   (edgedistill COMMAND --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from common.errors import EdgeDistillError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from common import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"edgedistill {name}", description=COMMANDS[name][1])
    function = name.replace("-", "_")
    getattr(module, f"{function}_arguments")(parser, argv[1:])
    args = parser.parse_args(argv[1:])
    try:
        return int(getattr(module, f"{function}_main")(args) or 0)
    except EdgeDistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
