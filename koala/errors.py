"""`ConfigError`, which any module may raise (the ground floor: imports nothing from koala).

A setting that cannot work is reported by the commands as one `error: ...` line with exit status 2
(koala.config.compose.exit_config_error). `koala.config.checks` raises it for every check it runs before a model
loads, and re-exports it (`from koala.config.checks import ConfigError` works too).
"""


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line a user can act on."""
