"""Probes: how much the loss grows when a unit is stored in a given format (see DESIGN.md, "probes")."""
from .base import Probe, get_probe, PROBES
from .table import SensitivityTable

__all__ = ["Probe", "get_probe", "PROBES", "SensitivityTable"]
