"""Errors a user can act on.

Every error raised for bad input names the file (or config key), the slide where there
is one, and the fix. The CLI prints the message without a traceback and exits with 2.
"""


class MambapathError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(MambapathError):
    """A config file or cohort sheet that does not match its schema."""


class SlideError(MambapathError):
    """A slide that cannot be opened or read."""


class NoTissueError(MambapathError):
    """A slide on which segmentation found no tissue."""


class DataError(MambapathError):
    """A table, split or feature file whose content does not fit what is asked of it."""
