"""
The HTTP API: routes, handlers, authentication, quotas per owner, the
worker endpoints, log follows, the event streams (C{_events}), the
OpenAPI document, the metrics (C{_metrics}, written by
C{prometheus_client}), and the dashboard at C{/ui/}: its static files (the
C{dashboard} directory, package data) and its cookie sessions
(C{_dashboard}).  It parses requests with L{dispatcher.wire}, calls
the dispatcher and the worker hub of L{dispatcher.core} it is given, and
answers through the request objects of L{dispatcher.http} it is handed
(it needs neither module itself).

May import: L{dispatcher.model}, L{dispatcher.config}, L{dispatcher.wire},
L{dispatcher.store}.
"""
