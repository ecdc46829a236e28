"""The Flower ServerApp: ``flwr run .`` reads ``[tool.flwr.app.config]`` into the run config."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation.run import FederationConfig, run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, FederationConfig.from_run_config(context.run_config))


def make_server_app(config: FederationConfig, on_round=None) -> ServerApp:
    """A ServerApp bound to a typed config (the simulation launcher uses this)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, on_round=on_round)

    return bound
