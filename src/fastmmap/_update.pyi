"""Type stub of fastmmap._update: Update is generic in its value's type
for type checkers only (at run time the module does not import typing)."""

from typing import Any, Final, Generic, TypeVar, final

from ._fastmmap import _ExpireOn, _ExpireTime

_T_co = TypeVar("_T_co", covariant=True)

__all__ = ["NO_CHANGE", "Entry", "Update"]

@final
class _NoChangeType:
    def __new__(cls) -> _NoChangeType: ...
    def __reduce__(self) -> str: ...

NO_CHANGE: Final[_NoChangeType]

@final
class Update(Generic[_T_co]):
    @property
    def value(self) -> _T_co: ...
    @property
    def expire_time(self) -> _ExpireTime | None: ...
    @property
    def expire_on(self) -> _ExpireOn | None: ...
    @property
    def keep_expiry(self) -> bool: ...
    def __init__(
        self,
        value: _T_co,
        expire_time: _ExpireTime | None = None,
        *,
        expire_on: _ExpireOn | None = None,
        keep_expiry: bool = False,
    ) -> None: ...

@final
class Entry:
    value: Any
    exists: bool
    expire_on: int | None
    modseq: int | None
    def __init__(self, value: Any, exists: bool, expire_on: int | None, modseq: int | None) -> None: ...
