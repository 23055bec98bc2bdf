"""Bad input (`InputError`: the CLI prints its message on one line and exits with code 2) and a machine that
cannot go on (`MachineError`: one line, exit code 1; what was written stays, so the same command continues)."""


class InputError(Exception):
    """A problem with what the user gave us (a file, a name, a config key, a request).

    The message must name the problem and where it is (file:line, config key, dataset name...).
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class MachineError(Exception):
    """The machine, not the input, stops the run (a full disk): one line naming where; nothing is discarded."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
