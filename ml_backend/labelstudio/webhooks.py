"""Label Studio webhook events the backend knows, and which of them schedule a training run (or its cold-start work)."""

from __future__ import annotations

from enum import Enum

__all__ = ["COLD_START_EVENTS", "TRAINING_EVENTS", "WebhookEvent"]


class WebhookEvent(str, Enum):
    """Label Studio webhook actions the backend knows; the first four schedule training."""

    ANNOTATION_CREATED = "ANNOTATION_CREATED"
    ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
    ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
    START_TRAINING = "START_TRAINING"
    ANNOTATIONS_CREATED = "ANNOTATIONS_CREATED"
    TASKS_CREATED = "TASKS_CREATED"
    TASKS_DELETED = "TASKS_DELETED"
    PROJECT_CREATED = "PROJECT_CREATED"
    PROJECT_UPDATED = "PROJECT_UPDATED"
    PROJECT_DELETED = "PROJECT_DELETED"


TRAINING_EVENTS = frozenset(
    {WebhookEvent.ANNOTATION_CREATED, WebhookEvent.ANNOTATION_UPDATED, WebhookEvent.ANNOTATIONS_DELETED,
     WebhookEvent.START_TRAINING}
)

COLD_START_EVENTS = frozenset({WebhookEvent.TASKS_CREATED})
"""Events that schedule a run only while the project has no model version: new tasks' images are embedded and the
labeling order and label propagation cover them (``ml_backend.training.coldstart``); once a model is live, new tasks
get their predictions from /predict and the next training."""
