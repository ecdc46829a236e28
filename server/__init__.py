"""The server, in rooms: `methods/` (the distillation methods and their registry) and
`federation/` (the Flower ServerApp, strategies, server distillation rounds); `commands` holds
the `distill` and `generate` subcommands."""
