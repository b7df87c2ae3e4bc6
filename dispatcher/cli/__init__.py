"""
The C{dispatcher} command's API commands (C{submit}, C{ls}, C{show},
C{logs}, C{wait}, C{cancel}, C{retry}, C{rm}, C{queues}, C{workers},
C{events}, C{me}, C{completion}): a dispatcher reached over HTTP through
L{dispatcher.client}, tables and progress bars for people, C{--json} for
scripts.  The local commands (C{worker}, C{store}, C{token}) live in
L{dispatcher.app}, which puts the two together.

May import: L{dispatcher.client}, L{dispatcher.wire}, L{dispatcher.model};
nothing of the server, so that the command starts fast (shell completion
runs it on every TAB) and runs on a host with no dispatcher.
"""

from dispatcher.cli._commands import api_commands

__all__ = ["api_commands"]
