"""The Flower ServerApp: ``flwr run .`` reads ``[tool.flwr.app.config]`` into the run config.

``edgedistill simulate`` submits this same app to a local simulation SuperLink, so the main job,
``flwr run .`` and a deployment all run one ServerApp. Each round prints one progress line
(``flwr run --stream`` and ``simulate`` show it).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation.run import FederationConfig, run_federation

app = ServerApp()


def report_round(record: dict) -> None:
    """One line per round: global accuracy on the test split, loss, devices kept and dropped."""
    devices = ""
    if "clients_ok" in record:
        devices = f"  clients ok {record['clients_ok']}, dropped {record['clients_dropped']}"
    failed = f"  (no new model: {record['failed']})" if "failed" in record else ""
    print(
        f"round {record['round']:>3}: global accuracy {100 * record['accuracy']:.2f} %  "
        f"loss {record['loss']:.4f}{devices}{failed}",
        flush=True,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, FederationConfig.from_run_config(context.run_config), on_round=report_round)
