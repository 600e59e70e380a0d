"""Task messages: small, versioned JSON that refers to the stored job spec.

    {"v": 1, "job": "<job id>", "spec": "<output>/jobs/<job id>/spec.json",
     "stage": 1, "box": {"start": [x, y, z], "stop": [x, y, z]}}

Never pickle.  :func:`Task.from_json` validates a received body strictly; a body
that fails raises :class:`TaskError`, and the worker lets such a message run
out its receives into the dead-letter queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .geometry import Box

VERSION = 1
STAGES = (1, 2)


class TaskError(ValueError):
    """A message that is not a valid task (a poison message)."""


@dataclass(frozen=True)
class Task:
    job_id: str
    spec_url: str
    stage: int
    box: Box

    def to_json(self) -> str:
        return json.dumps(
            {"v": VERSION, "job": self.job_id, "spec": self.spec_url, "stage": self.stage,
             "box": self.box.to_dict()},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, body: str) -> "Task":
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, TypeError) as e:
            raise TaskError(f"task message is not JSON ({e}): {body[:200]!r}") from None
        if not isinstance(doc, dict):
            raise TaskError(f"task message is not a JSON object: {body[:200]!r}")
        if doc.get("v") != VERSION:
            raise TaskError(f"task message version {doc.get('v')!r} is not supported (expected {VERSION})")
        expected = {"v", "job", "spec", "stage", "box"}
        if set(doc) != expected:
            raise TaskError(f"task message fields {sorted(doc)} are not {sorted(expected)}")
        if not isinstance(doc["job"], str) or not isinstance(doc["spec"], str):
            raise TaskError(f"task message job and spec must be strings: {body[:200]!r}")
        if type(doc["stage"]) is not int or doc["stage"] not in STAGES:  # not 1.0, not True
            raise TaskError(f"task message stage {doc['stage']!r} is not one of {list(STAGES)}")
        try:
            box = Box.from_dict(doc["box"])
        except (ValueError, TypeError) as e:
            raise TaskError(f"task message box: {e}") from None
        return cls(doc["job"], doc["spec"], doc["stage"], box)
