"""Why the job layer refuses a request; the API turns these into its envelope."""


class JobError(Exception):
    """A request the job layer refuses; the message is the reason after the route's prefix."""


class UnknownJob(JobError):
    """No such record, or not the caller's."""


class JobConflict(JobError):
    """The id is in use, or the job is not in a state that allows the request."""


class Busy(Exception):
    """The repository is busy with work that needs it alone (on another node of a cluster):
    try again shortly. Not a refusal of the request: the API answers 503."""
