"""The LHV error tree. Its codes are the wire codes of replies, acks and DLQ headers.

A leaf module: it imports nothing from LHV, so every other module (and the worker and
client) can import it without cycles.

    LhvError                      code            retriable
    ├── InvalidRequest            invalid_request no
    │   ├── DimMismatch           dim_mismatch    no
    │   └── TooLarge              invalid_request no   (a result over the caller's bound)
    ├── IndexNotFound             index_not_found no
    ├── IndexExists               index_exists    no
    ├── WrongPartition            wrong_partition no
    ├── NotReady                  not_ready       yes
    ├── DeadlineExceeded          deadline_exceeded yes
    └── Internal                  internal        yes
        ├── SnapshotError         internal        no   (truncated, corrupt, mismatched)
        └── EngineError           internal        yes  (the engine library failed)
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BY_CODE",
    "DeadlineExceeded",
    "DimMismatch",
    "EngineError",
    "IndexExists",
    "IndexNotFound",
    "Internal",
    "InvalidRequest",
    "LhvError",
    "NotReady",
    "SnapshotError",
    "TooLarge",
    "WrongPartition",
    "error_for_code",
]


class LhvError(Exception):
    """Root of every error LHV raises on purpose; `code` is what goes on the wire."""

    code: ClassVar[str] = "internal"
    retriable: ClassVar[bool] = False

    def __init__(self, message: str = "", *, item: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: position of the offending item inside its command, when one item is to blame
        self.item = item

    def to_wire(self) -> dict[str, object]:
        """The `error` object of a reply or ack."""
        out: dict[str, object] = {"code": self.code, "message": self.message}
        if self.item is not None:
            out["item"] = self.item
        return out


class InvalidRequest(LhvError):
    """A command or query breaks the schema, a limit, or a value rule (NaN, zero vector)."""

    code = "invalid_request"


class DimMismatch(InvalidRequest):
    """A vector's length differs from the index's `dim`, or a merge joins different dims."""

    code = "dim_mismatch"


class TooLarge(InvalidRequest):
    """A result too large to return whole: `size` bytes, over the caller's `limit`.
    Nothing was copied; ask for less."""

    def __init__(self, message: str = "", *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class IndexNotFound(LhvError):
    """The named index does not exist on its home partition."""

    code = "index_not_found"


class IndexExists(LhvError):
    """`create` named an existing index with different parameters."""

    code = "index_exists"


class WrongPartition(LhvError):
    """The record arrived on a partition that is not its index's home partition."""

    code = "wrong_partition"


class NotReady(LhvError):
    """The partition is still restoring, or not owned here; try again."""

    code = "not_ready"
    retriable = True


class DeadlineExceeded(LhvError):
    """The request's deadline passed before it could be answered."""

    code = "deadline_exceeded"
    retriable = True


class Internal(LhvError):
    """Anything unexpected. Any exception that is not an LhvError maps here."""

    code = "internal"
    retriable = True


class SnapshotError(Internal):
    """A snapshot is truncated, corrupted, or does not match the expected parameters.

    Such an object is never loaded.
    """

    retriable = False


class EngineError(Internal):
    """The engine library (hnswlib, annoy) raised; the original is chained."""


def _all_subclasses(cls: type[LhvError]) -> list[type[LhvError]]:
    out: list[type[LhvError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


#: wire code -> the most general class with that code
BY_CODE: dict[str, type[LhvError]] = {}
_CLASSES: list[type[LhvError]] = [LhvError, *_all_subclasses(LhvError)]
for _cls in _CLASSES:
    BY_CODE.setdefault(_cls.code, _cls)
BY_CODE["internal"] = Internal


def error_for_code(code: str, message: str = "") -> LhvError:
    """Build the error named by a wire code; unknown codes become `Internal`."""
    return BY_CODE.get(code, Internal)(message)
