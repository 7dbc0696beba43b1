"""DomexError and its subclasses: every message says what went wrong, why, and what to change.

The server maps these to HTTP status codes in one place; the CLI prints them without a traceback.
Errors about the caller's input also subclass ValueError so plain Python callers can catch them.
"""


class DomexError(Exception):
    """Base of every error domex raises on purpose."""

    http_status = 500


class MaskError(DomexError, ValueError):
    """A mask does not fit the model: wrong layer count, ids out of range, duplicates, too few experts."""

    http_status = 400


class BudgetError(DomexError, ValueError):
    """A budget is malformed or too small for the model's top-k."""

    http_status = 400


class UnsupportedFamily(DomexError, ValueError):
    """The model's architecture has no family adapter."""

    http_status = 400


class PoolError(DomexError):
    """An expert pool is missing, corrupt (checksum) or was built from another model (fingerprint)."""

    http_status = 500


class FingerprintMismatch(PoolError):
    """An artefact (pool, store, pattern) belongs to another model."""


class StoreError(DomexError):
    """The pattern store cannot be read or written as asked."""

    http_status = 500


class UnknownDomain(StoreError, KeyError):
    """A domain name that the store does not hold."""

    http_status = 404

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class DomainExists(StoreError):
    """A domain is registered already and --replace was not given."""

    http_status = 409


class DemoError(DomexError, ValueError):
    """A demo file is malformed: the message names the file, the line and the field."""

    http_status = 400


class CacheTooSmall(DomexError, ValueError):
    """A mask needs more resident slots than the budget gives a layer."""

    http_status = 400


class ScoreError(DomexError, ValueError):
    """Scores cannot be used: unknown criterion, wrong shape, or values a rule cannot rank."""

    http_status = 400


class EmptyStore(StoreError):
    """The store holds no domains, so there is nothing to match a query against."""

    http_status = 503


class ConfigError(DomexError, ValueError):
    """A setting domex does not know (a fallback policy, a matcher, a routing mode)."""

    http_status = 400


class ExportError(DomexError, ValueError):
    """A mask cannot become a compact checkpoint (non-uniform, too few experts) or the output folder is taken."""

    http_status = 400


class UpstreamUnavailable(DomexError):
    """The gateway has no healthy upstream server for a request."""

    http_status = 503


class InvalidName(StoreError, ValueError):
    """A domain name outside the allowed alphabet (it would break keys, headers or file names)."""

    http_status = 400


class StoreUnwritable(StoreError):
    """The store cannot take a write now: opened read-only, or the write itself failed (disk, permissions)."""

    http_status = 503


class BadRequest(DomexError, ValueError):
    """A request the server cannot serve as sent: empty or malformed text, a prompt longer than allowed."""

    http_status = 400


class PromptTooLong(BadRequest):
    """A prompt with more tokens than the model's context leaves room for (or --max-prompt-tokens)."""


class Unauthorized(DomexError):
    """An admin endpoint called without the right bearer token."""

    http_status = 401


class Overloaded(DomexError):
    """The server's waiting queue is full; the client should retry after `retry_after` seconds."""

    http_status = 429

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class BadGateway(DomexError):
    """An upstream server answered with a broken connection or protocol (the gateway)."""

    http_status = 502
