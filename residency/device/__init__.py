"""Device profiles: the planner's picture of one machine, loaded from JSON or measured here.

`load_profile("rx-7800-xt")` reads a shipped datasheet profile; `measure_profile("cpu", quick=True)` measures;
`machine_profile()` is this machine's, measured once and cached; `profile_for("calibrated", workload_fingerprint)`
its calibration for a model (residency.device.calibrated).
"""

from residency.device.auto_profile import cached_profile_path, machine_profile
from residency.device.calibrated import (
    CALIBRATED,
    find_calibrated,
    list_calibrated,
    profile_for,
    remove_calibrated,
    save_calibrated,
)
from residency.device.measure import default_device, measure_profile
from residency.device.profile import (
    BACKENDS,
    COMPUTE_DTYPES,
    LINK_DIRECTIONS,
    PROVENANCE_KINDS,
    Curve,
    DeviceProfile,
    Provenance,
)
from residency.device.profile_io import (
    PROFILE_SCHEMA_VERSION,
    load_profile,
    profile_from_dict,
    profile_to_dict,
    read_profile,
    resolve_profile,
    save_profile,
    shipped_profile_names,
)

__all__ = [
    "BACKENDS",
    "CALIBRATED",
    "COMPUTE_DTYPES",
    "LINK_DIRECTIONS",
    "PROVENANCE_KINDS",
    "PROFILE_SCHEMA_VERSION",
    "Curve",
    "DeviceProfile",
    "Provenance",
    "cached_profile_path",
    "default_device",
    "find_calibrated",
    "list_calibrated",
    "load_profile",
    "machine_profile",
    "measure_profile",
    "profile_for",
    "profile_from_dict",
    "profile_to_dict",
    "read_profile",
    "remove_calibrated",
    "resolve_profile",
    "save_calibrated",
    "save_profile",
    "shipped_profile_names",
]
