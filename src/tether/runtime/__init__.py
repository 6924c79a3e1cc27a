"""Running agents: ``Agent``, ``Context`` and the worker ``Runtime``."""

from tether.runtime.agent import Agent, Skill
from tether.runtime.context import Context
from tether.runtime.outcome import Outcome
from tether.runtime.worker import Runtime

__all__ = ["Agent", "Context", "Outcome", "Runtime", "Skill"]
