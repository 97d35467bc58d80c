"""The one exception type users see.

Every error caused by bad input (a file, a flag, a config value) is an `EdgesmithError` whose
message is a single line naming the file or field and what is wrong. The CLI prints it and exits
with status 2; anything else is a bug and keeps its traceback.
"""


class EdgesmithError(ValueError):
    """Bad input: the message is one line that names the file or field at fault."""
