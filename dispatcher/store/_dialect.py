"""
The store's SQL in two dialects: the operations and reads are written
once, in SQLite's SQL, and run on PostgreSQL through
L{dispatcher.store._postgres}, which rewrites each statement once (and
keeps it) by the few rules below.  Where a statement must say something
else on PostgreSQL, its module writes both texts side by side with
L{differs}; SQLite runs the first unchanged, at no cost.

The rules (L{postgres_text}): C{?} placeholders become C{%s} (and a
literal C{%} becomes C{%%}); the parts written in each dialect
(L{fragment}) take their PostgreSQL text; C{INDEXED BY name} (SQLite's planner hint)
goes, since PostgreSQL's planner keeps statistics; C{instr(a, b)} becomes
C{strpos(a, b)}.  The types are chosen so that nothing else differs: a
boolean is an C{INTEGER} 0 or 1 in both (as SQLite stores it), a time a
double, JSON is text that Python encodes and decodes, and every integer
a 64-bit one.

No SQL driver is imported here: this module is shared by both stores.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional, Sequence


class SQL(str):
    """
    A statement in SQLite's SQL (the string itself) that says something
    else on PostgreSQL: C{postgres}, written with C{%s} placeholders and
    used as it is, or C{None} for a statement PostgreSQL has no need of
    (it runs nothing there).
    """

    postgres: Optional[str]

    def __new__(cls, sqlite: str, postgres: Optional[str]) -> "SQL":
        made = super().__new__(cls, sqlite)
        made.postgres = postgres
        return made


class PagedSQL(SQL):
    """
    A statement whose rows PostgreSQL reads a page at a time, each page
    one statement (C{postgres} with C{LIMIT} added), the next page after
    the last row read: C{after}, the same statement with the condition
    that continues it, which binds what C{key} takes of the last row read
    after the statement's own parameters.  (A page a statement is one
    round trip; a server-side cursor took four: its declaration, its
    description, a fetch and its close.)
    """

    after: str
    key: Callable[[Sequence[Any]], tuple]

    def __new__(
        cls, sqlite: str, postgres: str, after: str, key: Callable[[Sequence[Any]], tuple]
    ) -> "PagedSQL":
        made = super().__new__(cls, sqlite, postgres)
        made.after = after
        made.key = key
        return made


def paged(
    sqlite: str, postgres: str, after: str, key: Callable[[Sequence[Any]], tuple]
) -> PagedSQL:
    """
    A statement written in each dialect whose rows PostgreSQL reads a page
    at a time (L{PagedSQL}).
    """
    return PagedSQL(sqlite, postgres, after, key)


def differs(sqlite: str, postgres: Optional[str]) -> SQL:
    """
    A statement written in each dialect: C{sqlite} for SQLite, C{postgres}
    (C{%s} placeholders; C{None}: nothing to run) for PostgreSQL.
    """
    return SQL(sqlite, postgres)


# The parts of statements written in each dialect (L{fragment}): SQLite's
# text to PostgreSQL's.
_FRAGMENTS: dict[str, str] = {}


def fragment(sqlite: str, postgres: str) -> str:
    """
    A part of statements (a condition that a query puts together with
    others) written in each dialect, both with C{?} placeholders: the
    SQLite text is returned, and wherever it appears in a statement the
    PostgreSQL text takes its place there.
    """
    _FRAGMENTS[sqlite] = postgres
    return sqlite


_INDEXED_BY = re.compile(r"\s+INDEXED BY \w+", re.IGNORECASE)
_INSTR = re.compile(r"\binstr\(", re.IGNORECASE)


@functools.lru_cache(maxsize=2048, typed=True)
def postgres_text(statement: str) -> Optional[str]:
    """
    The PostgreSQL text of C{statement} (see the module's rules), or
    C{None} if it runs nothing there.  Kept for each statement text: the
    store's statements are a few hundred fixed strings.
    """
    if isinstance(statement, SQL):
        return statement.postgres  # type: ignore[attr-defined]
    text = statement
    for sqlite, postgres in _FRAGMENTS.items():
        if sqlite in text:
            text = text.replace(sqlite, postgres)
    text = _INDEXED_BY.sub("", text)
    text = _INSTR.sub("strpos(", text)
    return text.replace("%", "%%").replace("?", "%s")
