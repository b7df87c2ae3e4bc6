"""
Where jobs live: the L{IJobStore} interface (C{_interface}), the values
and errors its methods give (C{_results}), and the SQLite store (C{_sqlite}:
schema, migrations, the group-commit writer and its typed write commands
in C{_writes}, queries).  Which jobs a claim takes is the model's claim
policy (L{dispatcher.model._claims}), which every store applies.

The only package that speaks SQL or imports C{sqlite3}.  May import:
L{dispatcher.model}, L{dispatcher.wire}, L{dispatcher.config}.
"""
