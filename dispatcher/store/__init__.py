"""
Where jobs live: the L{IJobStore} interface, its result types, and the
SQLite store (schema, migrations, the group-commit writer, queries).

The only package that speaks SQL or imports C{sqlite3}.  May import:
L{dispatcher.model}, L{dispatcher.wire}, L{dispatcher.config}.
"""
