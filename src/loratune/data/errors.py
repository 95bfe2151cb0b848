"""The one exception type of `loratune.data`."""


class DataError(ValueError):
    """Bad input data or data settings; the message names the file, line or record, and field."""
