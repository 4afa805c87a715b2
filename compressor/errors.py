"""The one exception type users see: a message that says what is wrong and what to do."""


class CompressorError(Exception):
    """Bad input or an unmet requirement. The CLI prints the message and exits with code 2."""


class CompressorWarning(UserWarning):
    """Something the user should know that does not stop the job. The CLI prints it as one line."""
