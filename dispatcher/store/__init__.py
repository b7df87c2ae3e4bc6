"""
Where jobs live: the L{IJobStore} interface (C{_interface}), the values
and errors its methods give (C{_results}), and the SQLite store: its
schema and migrations (C{_schema}), the group-commit writer, operations
and queries (C{_sqlite}) and the writer's typed commands (C{_writes}).
Which jobs a claim takes is the model's claim policy
(L{dispatcher.model._claims}), which every store applies.

The only package that speaks SQL or imports C{sqlite3}.  May import:
L{dispatcher.model}, L{dispatcher.wire}, L{dispatcher.config}.
"""
