"""The exceptions users see: a message that names the problem and the fix, and for a bad setting, which one."""


class LoramixError(Exception):
    """A user-facing error. The CLI prints its message without a traceback."""


class OptionError(LoramixError):
    """A setting that cannot run. `field` is the options dataclass field it is about, so each front end names it in
    its own words: the command line as its flag (`--every-k`), the server as its request field (`every_k`).

    Give `problem` as the rest of a sentence after the name ("must be positive, got 0."), or `sentence` when the
    message already names what it is about (a route spec)."""

    def __init__(self, field: str, problem: str = "", sentence: str | None = None):
        self.field = field
        self.problem = problem
        self.sentence = sentence
        super().__init__(self.worded(flag_name(field)))

    def worded(self, name: str) -> str:
        """The message with the setting called `name`."""
        return self.sentence if self.sentence is not None else f"{name} {self.problem}"


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")
