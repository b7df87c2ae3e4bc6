"""
The store's SQL dialect layer (dispatcher/store/_dialect.py): how a
statement written in SQLite's SQL is said to PostgreSQL, and the
statements written both ways.  (That every statement of the store runs on
both is the store contract's, run against both stores.)
"""

import sqlite3

from dispatcher.store._dialect import differs, fragment, postgres_text


def test_placeholders_hints_and_functions_are_rewritten():
    """A ? becomes %s, a literal % is doubled (psycopg reads % as a
    placeholder's start), SQLite's INDEXED BY goes, instr is strpos."""
    assert postgres_text(
        "SELECT id FROM jobs INDEXED BY jobs_queued WHERE queue = ? AND name LIKE 'a%'"
        " AND instr(job_ids, ?) > 0"
    ) == (
        "SELECT id FROM jobs WHERE queue = %s AND name LIKE 'a%%'"
        " AND strpos(job_ids, %s) > 0"
    )


def test_a_statement_written_both_ways_runs_each_text_on_its_engine():
    """differs() is SQLite's text to sqlite3 (which runs it as it is) and the
    other text to PostgreSQL; None runs nothing there."""
    both = differs("SELECT MAX(1, 2)", "SELECT GREATEST(1, 2)")
    assert sqlite3.connect(":memory:").execute(both).fetchone() == (2,)
    assert postgres_text(both) == "SELECT GREATEST(1, 2)"
    assert postgres_text(differs("CREATE TRIGGER t ...", None)) is None


def test_the_same_text_plain_and_written_both_ways_are_told_apart():
    """The rewrite is remembered by text and type: a plain statement with
    the same text as one written both ways keeps its own rewrite."""
    text = "SELECT 1 WHERE 2 = ?"
    assert postgres_text(differs(text, "SELECT 3")) == "SELECT 3"
    assert postgres_text(text) == "SELECT 1 WHERE 2 = %s"


def test_a_fragment_takes_its_postgresql_text_inside_any_statement():
    """A part written both ways (a condition a query puts together with
    others) is replaced wherever it appears, then rewritten as the rest."""
    condition = fragment("json_has(labels, ?)", "jsonb_exists(labels::jsonb, ?)")
    assert postgres_text(f"SELECT seq FROM jobs WHERE seq > ? AND {condition}") == (
        "SELECT seq FROM jobs WHERE seq > %s AND jsonb_exists(labels::jsonb, %s)"
    )
