"""The error every data reader raises (its own module so that readers and datasets can both import it)."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and line) and what is wrong."""
