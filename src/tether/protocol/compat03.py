"""A2A 0.3 <-> 1.0: requests come in as 0.3 and are lifted to 1.0; results go down.

0.3 differs in naming (``message/send``), discriminators (``kind``), lowercase
roles and states (``user``, ``input-required``), file parts nested under
``file`` and ``configuration.blocking`` instead of ``returnImmediately``.
"""

from __future__ import annotations

from typing import Any

from tether.core.states import TaskState
from tether.core.types import JSON

METHODS_03 = {
    "message/send": "SendMessage",
    "message/stream": "SendStreamingMessage",
    "tasks/get": "GetTask",
    "tasks/list": "ListTasks",
    "tasks/cancel": "CancelTask",
    "tasks/resubscribe": "SubscribeToTask",
    "tasks/pushNotificationConfig/set": "CreateTaskPushNotificationConfig",
    "tasks/pushNotificationConfig/get": "GetTaskPushNotificationConfig",
    "tasks/pushNotificationConfig/list": "ListTaskPushNotificationConfigs",
    "tasks/pushNotificationConfig/delete": "DeleteTaskPushNotificationConfig",
    "agent/getAuthenticatedExtendedCard": "GetExtendedAgentCard",
    "tasks/feedback": "tasks/feedback",
}

_ROLE_UP = {"user": "ROLE_USER", "agent": "ROLE_AGENT"}
_ROLE_DOWN = {v: k for k, v in _ROLE_UP.items()}


# -- 0.3 -> 1.0 (requests) ------------------------------------------------------


def part_up(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    kind = part.get("kind")
    out: JSON = {}
    if "metadata" in part:
        out["metadata"] = part["metadata"]
    if kind == "text" or (kind is None and "text" in part):
        out["text"] = part.get("text")
    elif kind == "data":
        out["data"] = part.get("data")
    elif kind == "file":
        f = part.get("file") or {}
        if "bytes" in f:
            out["raw"] = f["bytes"]
        if "uri" in f:
            out["url"] = f["uri"]
        if "name" in f:
            out["filename"] = f["name"]
        if "mimeType" in f:
            out["mediaType"] = f["mimeType"]
    else:
        return part
    return out


def message_up(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    out = {k: v for k, v in message.items() if k != "kind"}
    role = message.get("role")
    out["role"] = _ROLE_UP.get(role, role) if isinstance(role, str) else role
    if isinstance(message.get("parts"), list):
        out["parts"] = [part_up(p) for p in message["parts"]]
    return out


def send_params_up(params: Any) -> Any:
    if not isinstance(params, dict):
        return params
    out = dict(params)
    out["message"] = message_up(params.get("message"))
    config = params.get("configuration")
    if isinstance(config, dict):
        up = {k: v for k, v in config.items() if k not in ("blocking", "pushNotificationConfig")}
        if config.get("blocking") is False:
            up["returnImmediately"] = True
        out["configuration"] = up
    return out


def list_params_up(params: Any) -> Any:
    if isinstance(params, dict) and isinstance(params.get("status"), str):
        try:
            return {**params, "status": TaskState.from_wire(params["status"]).wire}
        except (KeyError, ValueError):
            return params
    return params


# -- 1.0 -> 0.3 (results) -------------------------------------------------------


def part_down(part: JSON) -> JSON:
    out: JSON = {}
    if "text" in part:
        out = {"kind": "text", "text": part["text"]}
    elif "data" in part:
        out = {"kind": "data", "data": part["data"]}
    else:
        f: JSON = {}
        if "raw" in part:
            f["bytes"] = part["raw"]
        if "url" in part:
            f["uri"] = part["url"]
        if "filename" in part:
            f["name"] = part["filename"]
        if "mediaType" in part:
            f["mimeType"] = part["mediaType"]
        out = {"kind": "file", "file": f}
    if "metadata" in part:
        out["metadata"] = part["metadata"]
    return out


def message_down(message: JSON) -> JSON:
    out: JSON = {**message, "kind": "message"}
    out["role"] = _ROLE_DOWN.get(message.get("role", ""), "agent")
    out["parts"] = [part_down(p) for p in message.get("parts", [])]
    return out


def artifact_down(artifact: JSON) -> JSON:
    return {**artifact, "parts": [part_down(p) for p in artifact.get("parts", [])]}


def status_down(status: JSON) -> JSON:
    out: JSON = {"state": TaskState.from_wire(status["state"]).value}
    if "timestamp" in status:
        out["timestamp"] = status["timestamp"]
    if "message" in status:
        out["message"] = message_down(status["message"])
    return out


def task_down(task: JSON) -> JSON:
    out: JSON = {
        "kind": "task",
        "id": task["id"],
        "contextId": task["contextId"],
        "status": status_down(task["status"]),
    }
    if "artifacts" in task:
        out["artifacts"] = [artifact_down(a) for a in task["artifacts"]]
    if "history" in task:
        out["history"] = [message_down(m) for m in task["history"]]
    if "metadata" in task:
        out["metadata"] = task["metadata"]
    return out


def stream_down(response: JSON) -> JSON:
    """A 1.0 ``StreamResponse`` (one-of wrapper) becomes the bare 0.3 event."""
    if "task" in response:
        return task_down(response["task"])
    if "message" in response:
        return message_down(response["message"])
    if "statusUpdate" in response:
        ev = response["statusUpdate"]
        state = TaskState.from_wire(ev["status"]["state"])
        return {
            "kind": "status-update",
            "taskId": ev["taskId"],
            "contextId": ev["contextId"],
            "status": status_down(ev["status"]),
            "final": state.terminal or state.interrupted,
        }
    ev = response["artifactUpdate"]
    out = {**ev, "kind": "artifact-update", "artifact": artifact_down(ev["artifact"])}
    return out


def result_down(method: str, result: JSON) -> Any:
    if method == "SendMessage":
        return stream_down(result)
    if method in ("GetTask", "CancelTask"):
        return task_down(result)
    if method == "ListTasks":
        return {**result, "tasks": [task_down(t) for t in result["tasks"]]}
    return result
