"""The built-in sandbox: simulators of the Uncash API (/api/v1) and of the Alix Pay API (/api/v2)
served over real HTTP on loopback, which enforce the documented rules (and the project's stated
assumptions), record exactly what they applied, and inject faults on demand.
"""

from runner.sandbox.alix_records import AlixTopup, TopupStatus, WebhookDelivery
from runner.sandbox.alix_state import AlixState
from runner.sandbox.config import AlixConfig, SandboxCard, SandboxConfig
from runner.sandbox.faults import FaultKind, FaultPlan
from runner.sandbox.server import (
    RunningAlix,
    RunningSandbox,
    make_app,
    run_standalone,
    serve_sandbox,
)
from runner.sandbox.state import AppliedTopup, Refusal, SandboxState

__all__ = [
    "AlixConfig",
    "AlixState",
    "AlixTopup",
    "AppliedTopup",
    "FaultKind",
    "FaultPlan",
    "Refusal",
    "RunningAlix",
    "RunningSandbox",
    "SandboxCard",
    "SandboxConfig",
    "SandboxState",
    "TopupStatus",
    "WebhookDelivery",
    "make_app",
    "run_standalone",
    "serve_sandbox",
]
