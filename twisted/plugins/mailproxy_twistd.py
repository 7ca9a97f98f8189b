from twisted.application.service import ServiceMaker

mailproxy = ServiceMaker(
    "mailproxy",
    "mailproxy.tap",
    "IMAP/POP3 access proxy with local authentication and filters.",
    "mailproxy",
)
