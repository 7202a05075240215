"""Domain errors. Each carries the code used in API errors and WebSocket error frames."""

from __future__ import annotations


class DomainError(Exception):
    code = "bad_request"
    status = 400

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail or self.__class__.__doc__ or self.code


class BadRequest(DomainError):
    """The request is malformed."""


class TooLong(DomainError):
    """The message body is too long."""

    code = "too_long"


class Forbidden(DomainError):
    """You may not do that."""

    code = "forbidden"
    status = 403


class NotFound(DomainError):
    """Not found."""

    code = "not_found"
    status = 404


class Conflict(DomainError):
    """That conflicts with what exists."""

    code = "conflict"
    status = 409


class RateLimited(DomainError):
    """Too many messages; slow down."""

    code = "rate_limited"
    status = 429


class Unavailable(DomainError):
    """A backing service is unavailable; try again."""

    code = "unavailable"
    status = 503
