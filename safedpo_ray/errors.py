"""The one base class of errors a user can fix (bad config, data or run name): the CLI prints
their message and exits 2 instead of showing a traceback."""


class UserError(ValueError):
    """A problem in what the user asked for; the message says what and where."""


class ConfigError(UserError):
    """A configuration problem; the message names the key."""


class EvalError(UserError):
    """An evaluation that cannot run as asked; the message says what to change."""
