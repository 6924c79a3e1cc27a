"""Per-task event fan-out: ``EventBus`` and its backends."""

from tether.events.base import EventBus, SubscriberLagged, Subscription
from tether.events.local import LocalEventBus

__all__ = ["EventBus", "LocalEventBus", "SubscriberLagged", "Subscription"]
