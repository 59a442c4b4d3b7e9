"""``method.faithful=true``: a method as its released code runs it (docs/faithful.md).

Each method lists the options whose values reproduce its reference implementation. With
``faithful`` those are set, and an option given explicitly with another value is an error naming
it (the preset would silently not be the released code otherwise). Options not listed (sparsity,
ratios, calibration) stay the user's.
"""

from __future__ import annotations

from typing import Any


def apply(data: Any, method: str, fixed: dict[str, Any]) -> Any:
    """For a ``mode="before"`` validator: ``data`` with ``fixed`` filled in when it asks for faithful."""
    if not isinstance(data, dict) or not data.get("faithful"):
        return data
    clash = {key: data[key] for key in fixed if key in data and data[key] != fixed[key]}
    if clash:
        given = ", ".join(f"{k}={v!r} (faithful: {fixed[k]!r})" for k, v in clash.items())
        raise ValueError(f"method.faithful=true fixes the options that reproduce {method}'s released code; "
                         f"drop {given}, or drop faithful")
    return {**data, **fixed}
