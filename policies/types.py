"""Immutable snapshots that policies read, and the decisions they return.

Policies never see an engine object: the engine scheduler, the global
scheduler and the simulator all build these snapshots from their own state,
so one policy serves all three.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray


class Strategy(str, enum.Enum):
    """What happens to a paused request's KV cache while its API call runs."""

    PRESERVE = "preserve"
    DISCARD = "discard"
    SWAP = "swap"


STRATEGY_BY_CODE: tuple[Strategy, ...] = (Strategy.PRESERVE, Strategy.DISCARD, Strategy.SWAP)
"""Strategies as small ints in columns: ``STRATEGY_BY_CODE[code]``."""
PRESERVE_CODE, DISCARD_CODE, SWAP_CODE = 0, 1, 2

_T = TypeVar("_T")


def strategy_code(strategy: Strategy) -> int:
    """The column code of `strategy` (its index in `STRATEGY_BY_CODE`)."""
    return STRATEGY_BY_CODE.index(strategy)


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a policy may know about one request at one scheduler iteration.

    Token counts are in tokens; durations in seconds. Predicted fields come
    from `policies.predictors` (or client hints, or an oracle in benchmarks).
    """

    request_id: str
    arrival_s: float
    """When the request first reached the engine (monotonic seconds)."""
    context_tokens: int
    """Tokens whose KV the request holds or will hold once (re)computed."""
    predicted_decode_tokens: int
    """Tokens still to generate before the next API call (or before the end)."""
    predicted_api_s: float | None
    """Duration of the next API call; None when no further call is expected."""
    predicted_api_return_tokens: int = 0
    """Tokens the next API call appends to the context."""
    waited_iterations: int = 0
    """Scheduler iterations spent waiting since the request last ran."""
    has_run: bool = False
    """Whether the request has been scheduled at least once."""
    resumed_strategy: Strategy | None = None
    """Set when the request is back from an API call that left its KV in this
    state (DISCARD: needs recompute, SWAP: needs swap-in); None otherwise."""
    queued_since_s: float = 0.0
    """When the request last entered the waiting queue (tail order for `vllm`)."""

    # The derived fields below exist on `RequestColumns` too, under the same
    # names, so that one formula reads either (see `policies._arrays`).

    @property
    def has_api_call(self) -> bool:
        """Whether an API call is expected after the decode."""
        return self.predicted_api_s is not None

    @property
    def api_s(self) -> float:
        """`predicted_api_s`, or 0.0 when no call is expected."""
        api_s = self.predicted_api_s
        return 0.0 if api_s is None else api_s

    @property
    def needs_recompute(self) -> bool:
        """The context must be (re)computed before decoding: never run, or back
        from an API call whose KV was discarded."""
        return not self.has_run or self.resumed_strategy is Strategy.DISCARD

    @property
    def needs_swap_in(self) -> bool:
        """The context must be copied back from host before decoding."""
        return self.has_run and self.resumed_strategy is Strategy.SWAP


@dataclass(frozen=True)
class BatchView:
    """The engine's running batch, as the strategy choice needs it."""

    running_context_tokens: int
    """Sum of context tokens of the requests currently running."""
    free_host_tokens: int
    """Tokens of KV that the host swap space can still take."""


# One row of `RequestColumns.from_views`: `struct` packs a request's numbers in
# one C call, far cheaper than converting a Python list per column. The waited
# iterations are not in it (they change every iteration). Four pad bytes make
# a row 56 bytes long, so that every number of a joined table sits on an
# 8-byte boundary and the columns can be views of the table: numpy reads an
# unaligned column several times slower than an aligned one.
_ROW = struct.Struct("=dddqqq????4x")
_ROW_FIELDS = (
    ("arrival_s", "<f8", 0),
    ("queued_since_s", "<f8", 8),
    ("api_s", "<f8", 16),
    ("context_tokens", "<i8", 24),
    ("predicted_decode_tokens", "<i8", 32),
    ("predicted_api_return_tokens", "<i8", 40),
    ("has_api_call", "?", 48),
    ("has_run", "?", 49),
    ("resumed_discard", "?", 50),
    ("resumed_swap", "?", 51),
)
ROW_DTYPE = np.dtype(
    {
        "names": [name for name, _, _ in _ROW_FIELDS],
        "formats": [fmt for _, fmt, _ in _ROW_FIELDS],
        "offsets": [offset for _, _, offset in _ROW_FIELDS],
        "itemsize": _ROW.size,
    }
)
"""The numpy layout of a `RequestColumns.row`, for callers that append fields
to the rows they join (`RequestColumns.from_table`)."""
assert ROW_DTYPE.itemsize == _ROW.size == 56


@dataclass(frozen=True, eq=False)
class RequestColumns:
    """Many `RequestView`s as read-only numpy columns, one entry per request.

    Built once per scheduler iteration (`from_views`) so that ranking and
    strategy choice run as array operations instead of a Python loop per
    request. Field names match `RequestView`'s fields and derived properties,
    so the formulas in `policies.memory`, `policies.waste` and
    `policies.starvation` read either.
    """

    request_ids: NDArray[np.object_]
    arrival_s: NDArray[np.float64]
    context_tokens: NDArray[np.int64]
    predicted_decode_tokens: NDArray[np.int64]
    api_s: NDArray[np.float64]
    """`predicted_api_s`, 0.0 where no call is expected (see `has_api_call`)."""
    has_api_call: NDArray[np.bool_]
    predicted_api_return_tokens: NDArray[np.int64]
    waited_iterations: NDArray[np.int64]
    has_run: NDArray[np.bool_]
    resumed_discard: NDArray[np.bool_]
    """`resumed_strategy is Strategy.DISCARD`."""
    resumed_swap: NDArray[np.bool_]
    """`resumed_strategy is Strategy.SWAP`."""
    queued_since_s: NDArray[np.float64]

    def __post_init__(self) -> None:
        n = len(self.request_ids)
        for name in _COLUMN_NAMES:
            column = getattr(self, name)
            if not isinstance(column, np.ndarray) or column.shape != (n,):
                raise ValueError(
                    f"{name} must be a 1-d numpy array of {n} entries (one per request_id), "
                    f"got {type(column).__name__} of shape {getattr(column, 'shape', None)}"
                )
        object.__setattr__(self, "_memo", {})

    def memo(self, key: Hashable, compute: Callable[[], _T]) -> _T:
        """`compute()`, run once per `key` for these columns.

        The columns never change, so a pure computation over them (the
        strategy wastes for one batch and cost model, which both `order` and
        `choose_strategies` need in one iteration) can be shared. `compute`
        must return read-only arrays: every caller gets the same ones.
        """
        memo: dict[Hashable, Any] = self._memo  # type: ignore[attr-defined]
        if key not in memo:
            memo[key] = compute()
        return memo[key]  # type: ignore[no-any-return]

    @staticmethod
    def row(view: RequestView) -> bytes:
        """`view` packed as one row for `from_rows`, without its waited
        iterations (they change every iteration; the rest only when the request
        does, so a caller may keep the row until then)."""
        api_s = view.predicted_api_s
        try:
            return _ROW.pack(
                view.arrival_s,
                view.queued_since_s,
                0.0 if api_s is None else api_s,
                view.context_tokens,
                view.predicted_decode_tokens,
                view.predicted_api_return_tokens,
                api_s is not None,
                view.has_run,
                view.resumed_strategy is Strategy.DISCARD,
                view.resumed_strategy is Strategy.SWAP,
            )
        except struct.error as exc:
            raise ValueError(f"a RequestView field is not a number of its type: {exc}") from exc

    @classmethod
    def from_rows(
        cls, request_ids: Sequence[str], rows: Sequence[bytes], waited_iterations: Sequence[int]
    ) -> RequestColumns:
        """Columns from packed `row`s and each request's waited iterations."""
        table = np.frombuffer(b"".join(rows), dtype=ROW_DTYPE)
        return cls.from_table(request_ids, table, waited_iterations)

    @classmethod
    def from_table(
        cls,
        request_ids: Sequence[str],
        table: NDArray[np.void],
        waited_iterations: Sequence[int],
    ) -> RequestColumns:
        """Columns viewing `table`, a read-only structured array that holds (at
        least) `ROW_DTYPE`'s fields at aligned offsets, one entry per request,
        and each request's waited iterations.

        The columns are views of the table, not copies: a policy reads most
        columns once per iteration, and a copy costs as much as that read.
        """
        if table.flags.writeable:
            raise ValueError("table must be read-only: the columns are views of it")
        n = len(request_ids)
        ids = np.empty(n, dtype=object)
        ids[:] = request_ids
        ids.flags.writeable = False
        if len(waited_iterations) != n:
            raise ValueError(
                f"waited_iterations must hold {n} entries (one per request_id), "
                f"got {len(waited_iterations)}"
            )
        try:
            # One struct call packs the counts: several times cheaper than np.fromiter.
            packed = struct.pack(f"={n}q", *waited_iterations)
        except struct.error as exc:
            raise ValueError(f"waited_iterations must be ints: {exc}") from exc
        waited = np.frombuffer(packed, dtype=np.int64)
        columns = {name: table[name] for name in ROW_DTYPE.names}
        return cls(request_ids=ids, waited_iterations=waited, **columns)

    @classmethod
    def from_views(cls, views: Sequence[RequestView]) -> RequestColumns:
        """Columns of `views`, in their order."""
        row = cls.row
        return cls.from_rows(
            [v.request_id for v in views],
            [row(v) for v in views],
            [v.waited_iterations for v in views],
        )

    @classmethod
    def of(cls, waiting: Sequence[RequestView] | RequestColumns) -> RequestColumns:
        """`waiting` itself if it is already columns, else `from_views(waiting)`."""
        return waiting if isinstance(waiting, RequestColumns) else cls.from_views(waiting)

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def needs_recompute(self) -> NDArray[np.bool_]:
        """Per request, `RequestView.needs_recompute`."""
        return ~self.has_run | self.resumed_discard

    @property
    def needs_swap_in(self) -> NDArray[np.bool_]:
        """Per request, `RequestView.needs_swap_in`."""
        return self.has_run & self.resumed_swap

    def take(self, positions: NDArray[np.intp]) -> RequestColumns:
        """The requests at `positions` (indices into these columns), in that order."""
        return replace(
            self, **{name: _taken(getattr(self, name), positions) for name in _COLUMN_NAMES}
        )

    def ids_at(self, positions: NDArray[np.intp]) -> list[str]:
        """Request ids at `positions`, in that order."""
        return self.request_ids[positions].tolist()

    def argsort(self, positions: NDArray[np.intp], *keys: NDArray[np.generic]) -> NDArray[np.intp]:
        """`positions` sorted by `keys` (primary first, each aligned with
        `positions`), then by request id: the order of ``sorted(key=lambda v:
        (*keys, v.request_id))``, stable where ids repeat.

        One plain sort when a float primary key has no ties (the common case);
        a lexicographic sort otherwise (at once for an integer primary key,
        where ties are the rule), then a sort by id only inside runs where
        every key ties.
        """
        if len(positions) < 2:
            return positions.copy()
        if keys[0].dtype.kind == "f":
            order = np.argsort(keys[0])
            primary = keys[0][order]
            if not (primary[1:] == primary[:-1]).any():
                return positions[order]
        order = np.lexsort(keys[::-1])  # stable: equal keys keep `positions` order
        ranked_positions = positions[order]
        tied = np.ones(len(order) - 1, dtype=bool)
        for key in reversed(keys):  # the last key ties least often: stop when nothing ties
            ranked = key[order]
            tied &= ranked[1:] == ranked[:-1]
            if not tied.any():
                return ranked_positions
        _sort_runs_by_id(ranked_positions, tied, self.request_ids)
        return ranked_positions


_COLUMN_NAMES = tuple(f.name for f in fields(RequestColumns))
"""`RequestColumns`' fields (all columns), looked up once: `fields()` is slow
for a check that runs every iteration."""


def _taken(column: NDArray[Any], positions: NDArray[np.intp]) -> NDArray[Any]:
    taken = column[positions]
    taken.flags.writeable = False
    return taken


def _sort_runs_by_id(
    order: NDArray[np.intp], tied: NDArray[np.bool_], ids: NDArray[np.object_]
) -> None:
    """Sort, in place, each run of `order` whose keys tie, by request id."""
    # tied[i]: entries i and i + 1 of `order` tie. A run starts where a tie
    # follows a non-tie and ends one entry after the streak's last tie.
    edges = np.diff(np.concatenate(([False], tied, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1) + 1
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        run = order[start:stop].tolist()
        order[start:stop] = sorted(run, key=ids.__getitem__)
