"""The one exception type users see.

Every check on user input raises :class:`LLMPruneError` with a message that says what was wrong and
what to do. The CLI prints these messages without a traceback; anything else is a bug.
"""

from __future__ import annotations


class LLMPruneError(Exception):
    """Bad input or an environment problem the user can fix."""
