"""MedZone hub side: governance store, ingest, sandbox policy, airlock and the CLI."""

__version__ = "0.1.0"
