"""One exception type for bad input: the CLI prints its message on one line and exits with code 2."""


class InputError(Exception):
    """A problem with what the user gave us (a file, a name, a config key, a request).

    The message must name the problem and where it is (file:line, config key, dataset name...).
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
