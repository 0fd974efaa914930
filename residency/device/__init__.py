"""Device profiles: the planner's picture of one machine, loaded from JSON or measured here.

`load_profile("rx-7800-xt")` reads a shipped datasheet profile; `measure_profile("cpu", quick=True)` measures.
"""

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
    "COMPUTE_DTYPES",
    "LINK_DIRECTIONS",
    "PROVENANCE_KINDS",
    "PROFILE_SCHEMA_VERSION",
    "Curve",
    "DeviceProfile",
    "Provenance",
    "default_device",
    "load_profile",
    "measure_profile",
    "profile_from_dict",
    "profile_to_dict",
    "read_profile",
    "resolve_profile",
    "save_profile",
    "shipped_profile_names",
]
