"""The one exception type users see: its message names the file/line/field and what to do."""


class GemmatuneError(Exception):
    """A user-facing failure. The CLI prints its message alone (no stack trace) and exits with status 2."""
