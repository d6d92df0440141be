"""Errors meant for people: the CLI prints the message as one line and exits with code 2."""


class UserError(Exception):
    """A bad name, path, config or checkpoint: the user can fix it; no traceback is shown."""


class RunBusy(UserError):
    """Another process holds the run's lock: it is training that run right now."""
