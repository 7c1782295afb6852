"""The one exception type users see: a one-line message naming the bad value; the CLI exits 2 on it."""


class ConceptEraseError(Exception):
    """Bad input or an unusable file. The message is one line and names the offending value."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): what a one-line error quotes."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
