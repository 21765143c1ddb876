"""Errors that are the user's to fix: the CLI prints them on one line, without a traceback."""


class BnrepairError(Exception):
    """Bad input (file, data, option): the message names what is wrong and where."""

    exit_code = 2


class InputError(BnrepairError):
    """A checkpoint or data file that cannot be used as given."""
