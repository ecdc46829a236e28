"""User-facing errors: one line that says what went wrong and how to fix it."""


class EdgeDistillError(Exception):
    """An error caused by input (a config value, a file, a dataset) that the user can fix.

    The CLI prints these as ``error: <message>`` with no traceback; anything else is a bug.
    """


class DatasetNotFoundError(EdgeDistillError):
    """A dataset's files are not where we looked."""


class ArtifactError(EdgeDistillError):
    """An artifact directory is missing, corrupt or does not match what was asked for."""


class ConfigError(EdgeDistillError):
    """A configuration value is out of range or unknown."""


class Cancelled(EdgeDistillError):
    """The run was cancelled from outside (a job service's client); nothing half-done is saved."""
