"""Task messages: small, versioned JSON that refers to the stored job spec.

    {"v": 1, "job": "<job id>", "spec": "<output>/jobs/<job id>/spec.json",
     "stage": 1, "box": {"start": [x, y, z], "stop": [x, y, z]}}

Stages (:data:`STAGE_NAMES`): 1 the network (partial sums), 2 the merge (the output),
3-5 blockwise segmentation (label each chunk, stitch its lower faces, write the
relabelled chunk), 6 the pyramid: one task per block of a downsampled level, whose
message adds ``"mip": k`` (its box is in mip-k voxels; every other box is at mip 0).

Never pickle.  :func:`Task.from_json` validates a received body strictly; a body
that fails raises :class:`TaskError`, and the worker lets such a message run
out its receives into the dead-letter queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .geometry import Box

VERSION = 1
STAGE_NAMES = {1: "network", 2: "merge", 3: "segment", 4: "stitch", 5: "labels", 6: "pyramid"}
STAGES = tuple(STAGE_NAMES)
PYRAMID = 6  # the one stage whose boxes are at a mip above 0


class TaskError(ValueError):
    """A message that is not a valid task (a poison message)."""


@dataclass(frozen=True)
class Task:
    job_id: str
    spec_url: str
    stage: int
    box: Box
    mip: int = 0  # pyramid tasks only: the level their box is at (1, 2, ...)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TaskError(f"task stage {self.stage!r} is not one of {list(STAGES)}")
        if (self.stage == PYRAMID) != (self.mip >= 1) or self.mip < 0:
            raise TaskError(f"task mip {self.mip!r}: a stage-{PYRAMID} (pyramid) task needs a mip of 1 or more, "
                            f"other stages none")

    def to_json(self) -> str:
        doc = {"v": VERSION, "job": self.job_id, "spec": self.spec_url, "stage": self.stage,
               "box": self.box.to_dict()}
        if self.mip:
            doc["mip"] = self.mip
        return json.dumps(doc, separators=(",", ":"))

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
        expected = {"v", "job", "spec", "stage", "box"} | ({"mip"} if doc.get("stage") == PYRAMID else set())
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
        mip = doc.get("mip", 0)
        if type(mip) is not int:
            raise TaskError(f"task message mip {mip!r} is not an integer")
        return cls(doc["job"], doc["spec"], doc["stage"], box, mip)
