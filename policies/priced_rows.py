"""Packed rows that carry a request's batch-independent terms, for an engine
that ranks the same waiting requests every iteration.

An engine keeps each waiting request's packed row until the request changes
and joins the rows every iteration (`RequestColumns.from_rows`). From those
columns the policies would then recompute, every iteration and for every
request, the parts of its wastes (`policies.waste.WasteTerms`) and of its
memory area (`policies.memory.AreaTerms`) that only the request and the cost
model decide, although only the running batch and the waited counts changed.
`PricedRows` packs those terms into the row too, under one cost model, and
hands them to the policies with the columns, so that an iteration computes
only the batch's part.

The terms in a row are the numbers the policies would compute from the
columns (the same operations on the same values, one request at a time
instead of a column at a time), so every decision is the same either way.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from policies.cost_model import CostModel
from policies.memory import AreaTerms, area_terms, keep_area_terms
from policies.types import ROW_DTYPE, RequestColumns, RequestView
from policies.waste import WasteTerms, keep_waste_terms, waste_terms

_WASTE_FIELDS = tuple(f"waste_{name}" for name in WasteTerms._fields)
_AREA_FIELDS = tuple(f"area_{name}" for name in AreaTerms._fields)
_TERM_FIELDS = ("priced_by", *_WASTE_FIELDS, *_AREA_FIELDS)
_TERMS = struct.Struct(f"=q{len(_TERM_FIELDS) - 1}d")
"""What follows `RequestColumns.row` in a priced row: the token of the
`PricedRows` that priced it (0: not priced), then the terms."""
_UNPRICED = _TERMS.pack(0, *[0.0] * (len(_TERM_FIELDS) - 1))
_DTYPE = np.dtype(
    {
        "names": [*ROW_DTYPE.names, *_TERM_FIELDS],
        "formats": [
            *(ROW_DTYPE.fields[name][0] for name in ROW_DTYPE.names),
            "<i8",
            *["<f8"] * (len(_TERM_FIELDS) - 1),
        ],
        "offsets": [
            *(ROW_DTYPE.fields[name][1] for name in ROW_DTYPE.names),
            *range(ROW_DTYPE.itemsize, ROW_DTYPE.itemsize + _TERMS.size, 8),
        ],
        "itemsize": ROW_DTYPE.itemsize + _TERMS.size,
    }
)
"""A priced row: `RequestColumns.row`'s fields, then `_TERMS`' (8-byte aligned)."""

_TOKENS = itertools.count(1)


@dataclass(frozen=True, eq=False)
class PricedRows:
    """Packs waiting requests as rows priced under `cost`, and joins them.

    Rows from another `PricedRows` (an older cost model) join as well, but
    then no row's terms are used: the columns are priced from scratch, which
    is correct and only slower. An engine makes a new `PricedRows` when its
    cost model changes and packs its waiting requests again.
    """

    cost: CostModel
    _token: int = field(init=False, repr=False, default_factory=lambda: next(_TOKENS))

    def row(self, view: RequestView) -> bytes:
        """`RequestColumns.row(view)` followed by its terms under `cost`.

        Raises ValueError as `RequestColumns.row`. A view whose terms raise
        (an invalid prediction) gets a row without terms, so that columns
        holding it are priced from scratch and raise only where a policy
        reads that request, as they would without priced rows.
        """
        row = RequestColumns.row(view)
        try:
            waste = waste_terms(view, self.cost)
            area = area_terms(view, self.cost)
        except ValueError:
            return row + _UNPRICED
        return row + _TERMS.pack(self._token, *waste, *area)

    def columns(
        self,
        request_ids: Sequence[str],
        rows: Sequence[bytes],
        waited_iterations: Sequence[int],
    ) -> RequestColumns:
        """Columns of packed `row`s and each request's waited iterations,
        carrying the rows' terms when every row was priced here."""
        table = np.frombuffer(b"".join(rows), dtype=_DTYPE)
        columns = RequestColumns.from_table(request_ids, table, waited_iterations)
        if (table["priced_by"] == self._token).all():
            waste = WasteTerms(*(table[name] for name in _WASTE_FIELDS))
            keep_waste_terms(columns, self.cost, waste)
            keep_area_terms(columns, self.cost, AreaTerms(*(table[name] for name in _AREA_FIELDS)))
        return columns
