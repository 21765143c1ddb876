"""Text from checkpoints and file names made safe to show: names are untrusted input.

A file or layer named with ESC sequences could otherwise move the cursor, retitle the window or hide
text, and one with [brackets] would be read as rich markup. Control characters become visible escapes
(``\\x1b``), and markup is escaped.
"""

from __future__ import annotations

import re

from rich.markup import escape

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """``text`` with every control character but tab and newline written as a ``\\xNN`` escape."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def shown(text: object) -> str:
    """``printable`` and markup-escaped: for a name placed inside rich markup or a table cell."""
    return escape(printable(text))
