from twisted.application.service import ServiceMaker

dispatcher = ServiceMaker(
    "dispatcher",
    "dispatcher.tap",
    "A networked job dispatcher: jobs over HTTP, run as processes or tasks.",
    "dispatcher",
)
