"""What the running command is doing right now: the interrupt message reads it.

The engine, the streaming store and the recovery loop record where they are (``update``); when
Ctrl-C stops a command, the CLI says from this record where the work stopped and what was or was
not written (``interrupt_message``). Plain data, no imports: it costs nothing when nobody asks.
"""

from __future__ import annotations

from typing import Any

_state: dict[str, Any] = {}


def update(**fields: Any) -> None:
    _state.update(fields)


def clear() -> None:
    _state.clear()


def snapshot() -> dict[str, Any]:
    return dict(_state)


def interrupt_message(state: dict[str, Any] | None = None) -> str:
    """``interrupted at layer 11/30; nothing written`` or, for resumable work, where its checkpoint is."""
    state = snapshot() if state is None else state
    where = ""
    if state.get("stage") == "layers" and state.get("layers"):
        where = f" at layer {state.get('layer', 0)}/{state['layers']}"
        if state.get("task"):
            where += f" ({state['task']})"
    elif state.get("stage") == "steps" and state.get("steps"):
        where = f" at step {state.get('step', 0)}/{state['steps']}"
    elif state.get("stage"):
        where = f" while {state['stage']}"
    partial = state.get("partial")
    if partial and state.get("checkpoint_step") is not None:
        saved = (f"checkpoint at step {state['checkpoint_step']} in {partial}" if state["checkpoint_step"]
                 else f"no checkpoint yet in {partial}")
        return f"interrupted{where}; {saved}; re-run the same command to resume"
    if partial and state.get("layers_done") is not None:
        return (f"interrupted{where}; {state['layers_done']} finished layer(s) kept in {partial}; "
                f"re-run the same command to resume")
    if state.get("written"):
        return f"interrupted{where}; already written: {state['written']}"
    return f"interrupted{where}; nothing written"
