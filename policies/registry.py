"""Policies built by name from config parameters.

Engine policies and dispatch policies are both chosen by a name in the
serving config, with parameters beside it. One `PolicyRegistry` per kind
keeps the names, so a config is checked against exactly what exists, and
every error names the kind, the policy and the parameter at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

_C = TypeVar("_C", bound=type)


class PolicyRegistry(Generic[_C]):
    """Classes of one kind of policy (`kind`, e.g. "engine policy"), by name.

    A registered class has a `name` class attribute and a `from_params(**params)`
    class method that builds it (raising ValueError for a bad parameter).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, _C] = {}

    def register(self, cls: _C) -> _C:
        """Class decorator: make `cls` buildable by `make(cls.name)`."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self._classes:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._classes[name] = cls
        return cls

    def names(self) -> tuple[str, ...]:
        """Names `make` accepts, sorted."""
        return tuple(sorted(self._classes))

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def check_name(self, name: str) -> str:
        """`name` if registered; else ValueError listing the known names."""
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; known policies: {list(self.names())}")
        return name

    def make(self, name: str, **params: Any) -> Any:
        """Build the policy registered as `name` with its parameters.

        Raises ValueError for an unknown name (listing the known ones), an
        unknown parameter, or an invalid value (naming the parameter).
        """
        cls = self._classes.get(name)
        if cls is None:
            raise ValueError(f"unknown {self.kind} {name!r}; known policies: {list(self.names())}")
        try:
            return cls.from_params(**params)  # type: ignore[attr-defined]
        except ValueError as exc:
            raise ValueError(f"{self.kind} {name!r}: {exc}") from exc

    def reject_unknown(self, name: str, params: Mapping[str, Any], known: set[str]) -> None:
        """Raise ValueError naming the parameters of `params` not in `known`."""
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} got unknown parameter(s) {unknown}; "
                f"it accepts {sorted(known)}"
            )
