"""The one non-finite step guard every training loop uses (the main loop, the VQ-VAE and codec loops,
the demo): an update is applied only when the loss and the gradient norm are finite, and
`max_bad_steps` skipped steps in a row stop the run with an OmniLMError. One NaN pixel stepped
unconditionally poisons nearly every tensor of a VQ-VAE within a step; skipped, it costs one batch.
"""

from __future__ import annotations

import math

import torch

from ..errors import OmniLMError


class NonFiniteGuard:
    def __init__(self, max_bad_steps: int = 10, what: str = "training", log=None):
        self.max_bad_steps, self.what, self.log = max_bad_steps, what, log
        self.streak = 0
        self.skipped = 0

    @staticmethod
    def finite(loss: float, grad_norm: float = 0.0) -> bool:
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def observe(self, step: int, loss: float, grad_norm: float = 0.0, hint: str = "") -> bool:
        """Record one step's outcome: True when it was finite (its update stands), False when it was
        skipped; raises after max_bad_steps skipped steps in a row."""
        if self.finite(loss, grad_norm):
            self.streak = 0
            return True
        self.streak += 1
        self.skipped += 1
        if self.log is not None:
            self.log(f"step {step}: non-finite loss {loss} or grad norm {grad_norm}; update skipped")
        if self.streak >= self.max_bad_steps:
            raise OmniLMError(
                f"{self.what}: {self.streak} non-finite steps in a row (last: step {step}, loss {loss}, "
                f"grad norm {grad_norm}); stopped. {hint}Lower the learning rate or check the data."
            )
        return False

    @staticmethod
    def snapshot(module: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
        """A copy of the state a forward pass may change in place (EMA codebooks, usage counters), taken
        before the forward, for `step(restore=...)`."""
        return module, {k: v.detach().clone() for k, v in module.state_dict().items()}

    def step(
        self,
        optimizer,
        loss: torch.Tensor,
        params,
        max_norm: float | None = None,
        step: int = 0,
        restore=None,
    ) -> bool:
        """Backward, clip (max_norm None: measure only), then step `optimizer` only if finite; gradients
        are cleared either way, and a skipped step puts back the `restore` snapshot (a VQ forward pass
        updates its codebook itself: one NaN pixel would otherwise poison it). Returns whether the
        update was applied."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")) if params else 0.0
        ok = self.observe(step, float(loss.detach()), float(norm))
        if ok:
            optimizer.step()
        elif restore is not None:
            module, state = restore
            with torch.no_grad():
                for k, v in module.state_dict().items():
                    v.copy_(state[k])
        optimizer.zero_grad(set_to_none=True)
        return ok
