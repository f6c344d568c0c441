"""Device profiles (one TOML file per target board), host probing and power sensors."""

from edgeopt.devices.profiles import (
    DeviceProfile,
    ProfileError,
    QuantCandidate,
    RuntimeOption,
    list_profiles,
    load_profile,
)

__all__ = [
    "DeviceProfile",
    "ProfileError",
    "QuantCandidate",
    "RuntimeOption",
    "list_profiles",
    "load_profile",
]
