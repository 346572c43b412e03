class SeFiError(ValueError):
    """The one user-facing error of this pack: the message says what is wrong and how to fix it."""
