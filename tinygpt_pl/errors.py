class UsageError(Exception):
    """Bad input from the user: the message says what was wrong and what to do; the CLIs print it as one line."""
