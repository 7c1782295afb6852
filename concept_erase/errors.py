"""The one exception type users see: a one-line message naming the bad value; the CLI exits 2 on it."""


class ConceptEraseError(Exception):
    """Bad input or an unusable file. The message is one line and names the offending value."""
