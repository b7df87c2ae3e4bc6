"""
The HTTP API: routes, handlers, authentication, the worker endpoints and
the OpenAPI document.  It parses requests with L{dispatcher.wire}, calls
L{dispatcher.core}, and answers.

May import: L{dispatcher.model}, L{dispatcher.config}, L{dispatcher.wire},
L{dispatcher.store}, L{dispatcher.core}, L{dispatcher.http}.
"""
