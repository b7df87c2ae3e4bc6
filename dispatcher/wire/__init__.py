"""
The JSON contract, declared once: what a client and a worker may send and
what they are answered, the JSON codec, and the checks that turn a request
body into model values.

May import: L{dispatcher.model}.
"""
