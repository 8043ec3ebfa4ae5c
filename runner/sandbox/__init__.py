"""The built-in sandbox: a simulator of the Uncash API served over real HTTP on loopback, which
enforces the documented rules, records exactly what it applied, and injects faults on demand.
"""

from runner.sandbox.config import SandboxCard, SandboxConfig
from runner.sandbox.faults import FaultKind, FaultPlan
from runner.sandbox.server import RunningSandbox, make_app, run_standalone, serve_sandbox
from runner.sandbox.state import AppliedTopup, Refusal, SandboxState

__all__ = [
    "AppliedTopup",
    "FaultKind",
    "FaultPlan",
    "Refusal",
    "RunningSandbox",
    "SandboxCard",
    "SandboxConfig",
    "SandboxState",
    "make_app",
    "run_standalone",
    "serve_sandbox",
]
