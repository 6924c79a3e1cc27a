"""Domain records to A2A 1.0 ProtoJSON."""

from __future__ import annotations

from tether.core.types import JSON, TaskEvent, TaskRecord, iso


def task_json(task: TaskRecord, *, artifacts: bool = True, history: bool = True) -> JSON:
    status: JSON = {"state": task.state.wire, "timestamp": iso(task.status_ts)}
    if task.status_message is not None:
        status["message"] = task.status_message
    out: JSON = {"id": task.id, "contextId": task.context_id, "status": status}
    if artifacts and task.artifacts:
        out["artifacts"] = task.artifacts
    if history and task.history:
        out["history"] = task.history
    if task.metadata:
        out["metadata"] = task.metadata
    return out


def event_json(event: TaskEvent) -> JSON:
    """A ``StreamResponse`` for one logged event."""
    return {"statusUpdate" if event.kind == "status" else "artifactUpdate": event.payload}
