"""User-facing errors: one line that says what is wrong and what to do."""


class TvmflowError(Exception):
    """An error caused by the user's input or environment, shown as one line without traceback."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
