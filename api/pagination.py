"""Keyset (cursor) pagination: `after` names the last object the client saw; the next page starts past
it along an index, so a page costs the same however deep the client has paged."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query
from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session

Limit = Annotated[int, Query(ge=1, le=100, description="page size")]
After = Annotated[str | None, Query(description="id of the last object of the previous page")]


def page(
    session: Session, stmt: Select, key: tuple, anchor: tuple[Any, ...] | None, limit: int, descending: bool = True
) -> list[Any]:
    """Up to limit + 1 objects of `stmt` (a select of one entity), see `paged`."""
    return list(session.scalars(paged(stmt, key, anchor, limit, descending)))


def paged(stmt: Select, key: tuple, anchor: tuple[Any, ...] | None, limit: int, descending: bool = True) -> Select:
    """`stmt` limited to up to limit + 1 rows ordered by the `key` columns, starting after `anchor` (a key value)."""
    if anchor is not None:
        row_key, cursor = tuple_(*key), tuple_(*anchor)
        stmt = stmt.where(row_key < cursor if descending else row_key > cursor)
    order = [c.desc() if descending else c.asc() for c in key]
    return stmt.order_by(*order).limit(limit + 1)
