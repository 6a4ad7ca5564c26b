"""Caching methods as policies behind one attachment mechanism (docs/architecture.md).

- `gates`: the LazyDiT gate bank and its file format.
- `config`: `LazyConfig`, the one frozen configuration of a lazy run.
- `policies`: `Policy` (the interface), `ReferenceGates`, `LookaheadGates`, `ForcedPlan`, the `--method` registry.
- `attach`: `apply_lazy()` and `LazyHandle`: a policy attached through the engine it names (`Policy.engine`).
- `hooks`: what the engines share: `LazyRun` (one run) and `BranchHook` (one branch: cache, history, decisions).
- `engine_module`, `engine_block`, `engine_residual`: the three engines, one file each.
- `forecast`: `ForecastHistory`, what a skipped row receives with forecast reuse (LazyDiT's and TaylorSeer's).
- `stats`: `LazyStats`, the counts every policy reports.
- `static`: FORA and TaylorSeer (fixed full steps; reuse or a Taylor forecast between them).
- `residual`: first-block cache and TeaCache (block-level residual caches deciding per step from a probe).
- Learning-to-Cache is `policies.Learning2Cache` on a router bank (`LazyGates(router=True)`).
"""

from lazydit.errors import GateMismatchError
from lazydit.lazy.config import LazyConfig
from lazydit.lazy.gates import GATE_FORMAT, LazyGates
from lazydit.lazy.attach import LazyHandle, apply_lazy
from lazydit.lazy.policies import (
    POLICIES,
    ForcedPlan,
    Learning2Cache,
    LookaheadGates,
    Policy,
    ReferenceGates,
    make_policy,
    policy_for,
    register_policy,
)
from lazydit.lazy.residual import FirstBlockCache, TeaCache, fit_teacache
from lazydit.lazy.static import FORA, TaylorSeer
from lazydit.lazy.foca import FoCa
from lazydit.lazy.tokens import ToCa  # noqa: F401  (registers --method toca)
from lazydit.lazy.stats import LazyStats

__all__ = ["FORA", "GATE_FORMAT", "POLICIES", "FirstBlockCache", "ForcedPlan", "GateMismatchError", "Learning2Cache",
           "FoCa", "TaylorSeer", "TeaCache", "fit_teacache", "LazyConfig", "LazyGates", "LazyHandle",
           "LazyStats", "LookaheadGates", "Policy", "ReferenceGates", "apply_lazy", "make_policy", "policy_for",
           "register_policy"]
