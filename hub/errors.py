"""Exceptions whose message is the one line a person sees (the CLI prints it and exits non-zero)."""


class MedZoneError(Exception):
    """A refusal or failure that is the caller's to fix; ``str(err)`` is shown as is."""

    exit_code = 1
    #: The HTTP status the hub API and the portal answer with.
    http_status = 400


class InvalidInput(MedZoneError):
    """Malformed arguments: a bad id, a missing file, an unparseable value."""


class NotFound(MedZoneError):
    """A named user, dataset, application or request does not exist."""

    http_status = 404


class Conflict(MedZoneError):
    """The thing exists already, or its state does not allow the change."""

    http_status = 409


class RuleViolation(MedZoneError):
    """A governance rule forbids the action (e.g. approving one's own application)."""

    http_status = 403


class IngestRefused(MedZoneError):
    """A source was refused; ``findings`` lists ``"<file>: <attribute or column> (<why>)"``."""

    def __init__(self, message: str, findings: list[str] | None = None):
        super().__init__(message)
        self.findings = list(findings or [])
