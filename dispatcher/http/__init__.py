"""
HTTP/1.1 framing only: a Twisted protocol that turns bytes into requests
and answers into bytes.  It knows no route, no job and no JSON contract.

May import: L{dispatcher.wire} (the JSON codec for error bodies).
"""
