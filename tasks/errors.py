"""User-facing errors: one line that says what is wrong and what to do, and the exit code that
tells a script which kind of failure it was (README, "Exit codes")."""

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug or an unexpected failure: anything that is not a TvmflowError
EXIT_USAGE = 2  # a bad flag, a bad model, bad input data
EXIT_GATE = 3  # a validation or precision gate failed: nothing was published
EXIT_UNREACHABLE = 4  # a device, tracker or store could not be reached


class TvmflowError(Exception):
    """An error caused by the user's input or environment, shown as one line without traceback."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class GateFailed(TvmflowError):
    """The build did not pass its validation or precision gate; nothing was published."""

    exit_code = EXIT_GATE


class Unreachable(TvmflowError):
    """A device, RPC tracker or object store did not answer (worth a retry later)."""

    exit_code = EXIT_UNREACHABLE


def exit_code(err: BaseException) -> int:
    """The process exit code for an exception that ended a command."""
    if isinstance(err, TvmflowError):
        return err.exit_code
    return EXIT_INTERNAL
