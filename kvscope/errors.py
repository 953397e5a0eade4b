"""The one exception type for bad input: the CLI turns it into a one-line message and exit code 2."""


class KvscopeError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model. Its message is one line."""
