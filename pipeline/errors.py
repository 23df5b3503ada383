"""Errors that mean "the user asked for something we cannot do": the CLI prints them as one line."""


class UserError(Exception):
    """Bad input or a bad on-disk state; the message is shown to the user as is, without a traceback."""
