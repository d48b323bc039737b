"""The one exception type loraflow raises for problems a user can fix.

Its message is meant to be printed as it is (no traceback): it names the file, row or field, what was
expected and what to do.
"""


class LoraflowError(Exception):
    """Bad input or an unsupported combination, explained for the person who has to fix it."""
