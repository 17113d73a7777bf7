"""Domain errors that fail a run on purpose, with a message a person can act on."""

from __future__ import annotations


class AtpError(Exception):
    """Base class of every error this pipeline raises on purpose."""


class DataContractError(AtpError):
    """Input broke its data contract; ``report`` names the file, column, rule and examples."""

    def __init__(self, report: str) -> None:
        super().__init__(report)
        self.report = report


class IngestError(AtpError):
    """A source file cannot be read as its layout promises (ragged rows, label length, format)."""


class ModelRegistryError(AtpError):
    """No usable model: missing alias, missing or altered artifact."""


class QualityGateError(AtpError):
    """A challenger did not earn promotion."""
