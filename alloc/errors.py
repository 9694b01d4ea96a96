"""One exception type for every mistake a user can make.

The CLI prints ``error: <message>`` and exits with status 2 for these; anything else is a bug and keeps its
traceback. Messages are one line and say how to fix the problem.
"""


class BitallocError(ValueError):
    """Bad input: a budget, a model, a plan, a table or a file the user gave us."""


class SettingError(BitallocError):
    """Bad value of one setting (a field of a verb's config, alloc/config.py). ``field`` names it; the message
    is a template with ``{name}`` where the setting is named, so each surface words it its own way: the CLI
    as its flag (``--budget``), the service as its JSON field (``field 'budget_bits'``), Python as the field."""

    def __init__(self, field: str, template: str):
        self.field, self.template = field, template
        super().__init__(template.replace("{name}", field))

    def worded(self, name: str) -> str:
        return self.template.replace("{name}", name)


class BitallocWarning(UserWarning):
    """Something the user should know that does not stop the work (a width mapped up, an expert rounded to
    nearest); the CLI prints each as one ``bitalloc: warning: ...`` line."""


def few(names, k: int = 3) -> str:
    """The first ``k`` names for a one-line message, and how many more: "a, b, c, … (+4)"."""
    names = list(names)
    return ", ".join(names[:k]) + (f", … (+{len(names) - k})" if len(names) > k else "")
