"""Scripted multi-user scenarios: TOML files, one interpreter, two worlds, one verdict."""

from balancesim.scenarios._model import FILES, Participant, Scenario, ScenarioError, Step, load
from balancesim.scenarios._run import Outcome, run_scenario
from balancesim.scenarios._worlds import InProcessWorld, OpFailed, RemoteWorld, ledger_digest

__all__ = [
    "FILES", "InProcessWorld", "OpFailed", "Outcome", "Participant", "RemoteWorld", "Scenario",
    "ScenarioError", "Step", "ledger_digest", "load", "run_scenario",
]
