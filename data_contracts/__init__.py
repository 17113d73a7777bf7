"""Declarative data contracts (YAML) and the loader that turns them into typed rules."""

from data_contracts.contract import Contract, SensorRule, list_contracts, load_contract

__all__ = ["Contract", "SensorRule", "list_contracts", "load_contract"]
