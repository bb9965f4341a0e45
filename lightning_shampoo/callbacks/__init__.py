"""Lightning callbacks: the drop-in, the frequency scheduler, health monitoring, the SGD fallback."""

from .fallback import SGDFallback
from .frequency import PreconditionFrequencyScheduler
from .health import PreconditionerHealthMonitor
from .shampoo import ShampooCallback

__all__ = [
    "PreconditionFrequencyScheduler",
    "PreconditionerHealthMonitor",
    "SGDFallback",
    "ShampooCallback",
]
