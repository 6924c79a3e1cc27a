"""Work queue: ``Broker`` and its backends."""

from tether.broker.base import Broker, Delivery
from tether.broker.local import LocalBroker

__all__ = ["Broker", "Delivery", "LocalBroker"]
