"""Lightning callbacks: the drop-in, the frequency scheduler, health monitoring, the SGD fallback,
the iterate-averaging switch."""

from .averaging import IterateAveragingSwitch
from .fallback import SGDFallback
from .frequency import PreconditionFrequencyScheduler
from .health import PreconditionerHealthMonitor
from .shampoo import ShampooCallback

__all__ = [
    "IterateAveragingSwitch",
    "PreconditionFrequencyScheduler",
    "PreconditionerHealthMonitor",
    "SGDFallback",
    "ShampooCallback",
]
