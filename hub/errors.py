"""Exceptions whose message is the one line a person sees (the CLI prints it and exits non-zero)."""


class MedZoneError(Exception):
    """A refusal or failure that is the caller's to fix; ``str(err)`` is shown as is."""

    exit_code = 1


class InvalidInput(MedZoneError):
    """Malformed arguments: a bad id, a missing file, an unparseable value."""


class NotFound(MedZoneError):
    """A named user, dataset, application or request does not exist."""


class Conflict(MedZoneError):
    """The thing exists already, or its state does not allow the change."""


class RuleViolation(MedZoneError):
    """A governance rule forbids the action (e.g. approving one's own application)."""


class IngestRefused(MedZoneError):
    """A source was refused; ``findings`` lists ``"<file>: <attribute or column> (<why>)"``."""

    def __init__(self, message: str, findings: list[str] | None = None):
        super().__init__(message)
        self.findings = list(findings or [])
