"""What a get_and_set function or a read_cb may return besides a plain value.

``get_and_set(key, fn)`` stores whatever ``fn`` returns, and ``read_cb``'s
result is stored with the cache's default expiry.  These objects let them
say more, as Cache::FastMmap's ``get_and_set`` sub does by returning an
empty list or ``($value, {expire_on => ...})``:

* ``NO_CHANGE``: store nothing (the key keeps its value and expiry);
* ``Update(value, expire_time=..., expire_on=..., keep_expiry=...)``: store
  ``value`` with its own expiry, or with the expiry the entry already had;
* ``Entry``: what ``get_and_set(..., entry=True)`` passes to ``fn``: the
  current value with whether it exists, its expiry and its modseq, so that
  an absent key and a stored ``None`` differ.

The C core recognises them once ``fastmmap`` registers them at import.
"""

from __future__ import annotations

from . import _options

# Names for type checkers only; at run time the typing module is not
# imported (as in fastmmap/__init__.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

__all__ = ["NO_CHANGE", "Entry", "Update"]


class _NoChangeType:
    """The type of ``fastmmap.NO_CHANGE``; it has one instance."""

    __slots__ = ()
    _instance: _NoChangeType | None = None

    def __new__(cls) -> _NoChangeType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "fastmmap.NO_CHANGE"

    def __reduce__(self) -> str:
        # pickles (and copies) as the singleton itself
        return "NO_CHANGE"


#: Returned by a get_and_set function: store nothing.
NO_CHANGE: Final = _NoChangeType()


class Update:
    """A value to store with its own expiry.

    Return it from a ``get_and_set`` function or a ``read_cb``.  At most
    one of ``expire_time`` (relative, as in ``set``), ``expire_on``
    (absolute unix seconds, 0 = never) and ``keep_expiry=True`` (the expiry
    the entry has now; the call's expiry if the key is absent) may be
    given; with none, the call's expiry (the cache's default) applies.
    """

    __slots__ = ("expire_on", "expire_time", "keep_expiry", "value")

    value: Any
    expire_time: Any
    expire_on: Any
    keep_expiry: bool

    def __init__(
        self,
        value: Any,
        expire_time: Any = None,
        *,
        expire_on: float | None = None,
        keep_expiry: bool = False,
    ) -> None:
        if not isinstance(keep_expiry, bool):
            raise TypeError(f"keep_expiry must be True or False, got {keep_expiry!r}")
        given = [
            name
            for name, v in (("expire_time", expire_time), ("expire_on", expire_on))
            if v is not None
        ] + (["keep_expiry"] if keep_expiry else [])
        if len(given) > 1:
            raise ValueError(
                f"Update takes at most one of expire_time, expire_on and keep_expiry, got {' and '.join(given)}"
            )
        if expire_time is not None:
            # the same rules as every per-call expire_time (checked now, so
            # that a bad one fails where the Update is made)
            _options.parse_expire_time(expire_time)
        if expire_on is not None and (
            isinstance(expire_on, bool)
            or not isinstance(expire_on, (int, float))
            or not 0 <= expire_on <= 0xFFFFFFFF
        ):
            raise ValueError(
                f"expire_on must be unix seconds between 0 (never) and 2**32-1, got {expire_on!r}"
            )
        self.value = value
        self.expire_time = expire_time
        self.expire_on = expire_on
        self.keep_expiry = keep_expiry

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={getattr(self, name)!r}"
            for name in ("expire_time", "expire_on")
            if getattr(self, name) is not None
        )
        if self.keep_expiry:
            extra += ", keep_expiry=True"
        return f"fastmmap.Update({self.value!r}{extra})"


class Entry:
    """A key's state as ``get_and_set(..., entry=True)`` shows it to ``fn``.

    ``value``: the current value, or get_and_set's ``default`` if the key
    is absent; ``exists``: true if the key holds a value (not expired, not
    a tombstone); ``expire_on``: its absolute expiry in unix seconds (0 =
    never), None if absent; ``modseq``: its modseq, None if absent or
    stored without one.
    """

    __slots__ = ("exists", "expire_on", "modseq", "value")

    def __init__(self, value: Any, exists: bool, expire_on: int | None, modseq: int | None) -> None:
        self.value = value
        self.exists = exists
        self.expire_on = expire_on
        self.modseq = modseq

    def __repr__(self) -> str:
        return (
            f"fastmmap.Entry(value={self.value!r}, exists={self.exists!r}, "
            f"expire_on={self.expire_on!r}, modseq={self.modseq!r})"
        )
