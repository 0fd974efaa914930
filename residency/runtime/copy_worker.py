"""The copy engine's worker thread, where the backends import it from: `residency.device.copy_worker` holds it.

It lives in the device layer so the CPU measurement times the same worker the runtime runs.
"""

from residency.device.copy_worker import MARK_RING, CopyWorker

__all__ = ["MARK_RING", "CopyWorker"]
