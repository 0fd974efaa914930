"""Telemetry: per latent frame and per block, what the runtime measured beside what the plan predicted.

The recorder keeps raw timestamps in a preallocated ring; snapshots handed out are immutable.
"""

from residency.telemetry.chrome_trace import chrome_trace, write_chrome_trace
from residency.telemetry.recorder import BlockTiming, FrameRecord, Recorder, TelemetrySnapshot

__all__ = ["BlockTiming", "FrameRecord", "Recorder", "TelemetrySnapshot", "chrome_trace", "write_chrome_trace"]
