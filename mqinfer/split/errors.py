"""The one error of splitting: what was asked cannot be done, and why."""


class SplitError(Exception):
    """The model cannot be split as asked; the message says what was wrong and what was
    expected."""
