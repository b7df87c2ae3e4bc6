from twisted.application.service import ServiceMaker

dispatcher = ServiceMaker(
    "dispatcher",
    "dispatcher.app.tap",
    "A networked job dispatcher: jobs over HTTP, run as processes or tasks.",
    "dispatcher",
)

dispatcher_worker = ServiceMaker(
    "dispatcher-worker",
    "dispatcher.app.worker_tap",
    "A remote worker: pulls jobs from a dispatcher over HTTP and runs them here.",
    "dispatcher-worker",
)
