"""Tools for working on MedZone itself (not used by the running zone)."""
