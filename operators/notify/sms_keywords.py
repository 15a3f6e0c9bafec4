"""What an inbound SMS asks for, and the TwiML that answers it.

Carriers and Twilio recognise a message that is only a keyword (any case, surrounding spaces and
a trailing full stop or exclamation mark ignored): STOP, STOPALL, UNSUBSCRIBE, CANCEL, END,
QUIT opt the number out; START, UNSTOP, YES opt it back in; HELP (and INFO) ask who is
writing. Anything else is a reply to a notification, which fanfare does not read. The answer
is TwiML: a `<Message>` to send back, or an empty `<Response/>`.
"""

from __future__ import annotations

from typing import Literal
from xml.sax.saxutils import escape

Keyword = Literal["stop", "start", "help"]

STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "UNSTOP", "YES"})
HELP_WORDS = frozenset({"HELP", "INFO"})

REPLIES: dict[Keyword, str] = {
    "stop": "You will get no more text messages from us. Reply START to get them again.",
    "start": "You will get our text messages again. Reply STOP to stop them, HELP for help.",
    "help": (
        "Notifications from our service. Reply STOP to stop text messages, START to get them "
        "again. Msg&data rates may apply."
    ),
}


def parse_keyword(body: str) -> Keyword | None:
    """The keyword an inbound message is, or None when it is anything else."""
    word = body.strip().rstrip(".!").strip().upper()
    if word in STOP_WORDS:
        return "stop"
    if word in START_WORDS:
        return "start"
    if word in HELP_WORDS:
        return "help"
    return None


def twiml(message: str | None) -> str:
    """A TwiML document that sends `message` back (None: answers nothing)."""
    if message is None:
        return '<?xml version="1.0" encoding="UTF-8"?><Response/>'
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Message>{escape(message)}</Message></Response>"
    )
