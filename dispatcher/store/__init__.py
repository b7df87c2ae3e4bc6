"""
Where jobs live: the L{IJobStore} interface (C{_interface}), the values
and errors its methods give (C{_results}), and the SQLite store
(C{_sqlite}, which opens the file and delegates to the rest): its schema
and migrations (C{_schema}), the group-commit writer (C{_writer}) and its
typed write commands (C{_writes}), the write operations (C{_operations}:
submissions in C{_submissions}, claims and ends in C{_leases}, what a job
waits for in C{_waits}, removals of finished jobs in C{_removal}, arrays
and batches: counts, cancels and retries in C{_groups}, the webhook
outbox's reads and writes in C{_deliveries}), the events of
every change, stored in its commit, read back and removed when old
(C{_events}), each
owner's unfinished jobs and every job by queue and state as the writer
counts them (C{_counts}), the
reads (C{_queries}), the jobs table's
columns with how a row maps to and from a job (C{_rows}), and what the
store keeps as JSON, its own form and not the API's (C{_stored}).
Which jobs a claim takes is the model's claim policy
(L{dispatcher.model._claims}), which every store applies.

The PostgreSQL store (C{_postgres}, chosen by C{[store] url}) runs the
same operations and reads on PostgreSQL, their SQL rewritten by the
dialect layer (C{_dialect}), with its own schema and migrations
(C{_pg_schema}); several dispatchers on one database hear each other's
commits through C{_pg_events} (C{LISTEN/NOTIFY}, with polls).

The only package that speaks SQL or imports C{sqlite3} or C{psycopg}
(which only C{_postgres} imports).  May import:
L{dispatcher.model}: the form a job is stored in is the store's own
(C{_stored}), not the API's.
"""
