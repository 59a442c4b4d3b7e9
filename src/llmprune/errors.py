"""The one exception type users see.

Every check on user input raises :class:`LLMPruneError` with a message that says what was wrong and
what to do. The CLI prints these messages without a traceback; anything else is a bug.
"""

from __future__ import annotations


class LLMPruneError(Exception):
    """Bad input or an environment problem the user can fix."""


def did_you_mean(name: object, choices: object) -> str:
    """`` (did you mean wanda?)`` when ``name`` is close to one of ``choices``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.6)  # type: ignore[attr-defined]
    return f" (did you mean {' or '.join(close)}?)" if close else ""
