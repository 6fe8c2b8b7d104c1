"""Per-layer updates (GaLore's and SLTrain's memory device): each parameter is stepped inside backward.

An ordinary step holds the gradient of every parameter at once between ``loss.backward()`` and
``optimizer.step()``. With :class:`PerLayerOptimizer`, each trainable parameter gets its own optimizer and a
``Tensor.register_post_accumulate_grad_hook``: as soon as autograd has accumulated that parameter's gradient, the
hook runs its optimizer's ``step()`` and frees the gradient. At any moment of the backward only the gradients of
the parameters whose accumulation is in flight exist, never the whole model's (Zhao et al., GaLore, arXiv
2403.03507, Section 4.3; Han et al., SLTrain, arXiv 2406.02214, Section 4 "per-layer weight updates").

Updating a parameter in the middle of backward is safe: its hook fires only after every autograd node that uses
it has produced its gradient, so no later node reads it. The result equals the ordinary loop for any optimizer
whose update of a parameter depends on that parameter's gradient and state only (SGD, momentum, Adam, AdamW, ...).

What it cannot do (by construction): clip gradients by their *global* norm (the whole-model gradient never exists;
clip per parameter inside ``optimizer_factory``'s optimizer if needed), and accumulate gradients over several
backward passes (every backward steps; ``step()`` raises when it sees more than one backward since the previous
call). See :func:`check_trainer_args` for ``transformers.Trainer``: it refuses both before training starts.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from typing import Callable, Iterable

import torch

__all__ = ["PerLayerOptimizer", "check_trainer_args"]


class PerLayerOptimizer(torch.optim.Optimizer):
    """One optimizer per trainable parameter, stepped by a gradient hook during backward; ``step()`` is a no-op.

    It is a ``torch.optim.Optimizer`` whose ``param_groups`` are the inner optimizers' own groups (the same dicts),
    so an LR scheduler built on it (``LambdaLR``, transformers' ``get_scheduler``) sets the learning rate every inner
    optimizer reads. ``state_dict()`` / ``load_state_dict()`` save and restore every inner optimizer.

    Args:
        params (`Iterable[torch.nn.Parameter]`): the parameters to train (those without ``requires_grad`` are
            skipped; a parameter listed twice, e.g. tied embeddings, is stepped once).
        optimizer_factory (`Callable[[list], torch.optim.Optimizer]`): builds the optimizer of one parameter, e.g.
            ``lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.0)``.

    Example:
        ```python
        opt = PerLayerOptimizer(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=3e-3))
        for batch in loader:
            model(**batch).loss.backward()  # every parameter is updated here
            opt.step()  # no-op, kept so the loop reads as usual
        ```
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer_factory: Callable[[list], torch.optim.Optimizer]):
        unique: dict[int, torch.nn.Parameter] = {}
        for p in params:
            if p.requires_grad:
                unique.setdefault(id(p), p)
        if not unique:
            raise ValueError("PerLayerOptimizer: no parameter requires grad; pass model.parameters() of a model to train.")
        plist = list(unique.values())
        super().__init__(plist, defaults={})
        self.optimizers: dict[int, torch.optim.Optimizer] = {id(p): optimizer_factory([p]) for p in plist}
        self._params = plist
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self.enabled = True
        self._passes: Counter[int] = Counter()  # hook steps per parameter since the last step(): 2+ = accumulation
        self._take_over(plist)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in plist]

    def _take_over(self, params: list[torch.nn.Parameter]) -> None:
        """A parameter is stepped by one PerLayerOptimizer: the newest. An earlier one's hooks stayed registered,
        stepped first and freed the gradient, so the new optimizer never stepped (and the old one kept training)."""
        earlier = {id(owner): owner for p in params
                   if (owner := getattr(p, "_slpeft_step_owner", lambda: None)()) is not None and owner._handles}
        for owner in earlier.values():
            owner.remove_hooks()
            warnings.warn("PerLayerOptimizer: these parameters had an earlier PerLayerOptimizer; its gradient hooks "
                          "are removed, and only the new one steps them.", stacklevel=3)
        for p in params:
            p._slpeft_step_owner = weakref.ref(self)

    def _hook(self, param: torch.Tensor) -> None:
        if not self.enabled:
            return
        opt = self.optimizers[id(param)]
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._passes[id(param)] += 1

    def step(self, closure=None):
        """A no-op (every parameter was stepped during backward); evaluates ``closure`` if given.

        Raises ``RuntimeError`` if a parameter was stepped by more than one backward since the previous call: the
        caller accumulates gradients over micro-batches (e.g. ``Trainer`` with ``gradient_accumulation_steps > 1``),
        which per-layer updates cannot do; each micro-batch was an update of its own."""
        passes = max(self._passes.values(), default=1)
        self._passes.clear()
        if passes > 1:
            raise RuntimeError(
                f"PerLayerOptimizer: {passes} backward passes ran since the last optimizer.step(), and each updated "
                "the parameters (per-layer updates step inside backward): gradients cannot be accumulated over "
                "micro-batches. Use one backward per step (Trainer: gradient_accumulation_steps=1, a larger "
                "per-device batch; check_trainer_args(args) catches this before training)."
            )
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients a hook did not consume (e.g. from a backward run while ``enabled`` was False)."""
        for p in self._params:
            if p.grad is not None:
                p.grad = None if set_to_none else p.grad.zero_()

    def state_dict(self) -> dict:
        return {"per_parameter": [self.optimizers[id(p)].state_dict() for p in self._params]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("per_parameter")
        if states is None or len(states) != len(self._params):
            raise ValueError(
                f"PerLayerOptimizer.load_state_dict: expected {len(self._params)} per-parameter states, got "
                f"{None if states is None else len(states)}; the state was saved for another model or optimizer."
            )
        for p, state in zip(self._params, states):
            self.optimizers[id(p)].load_state_dict(state)
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]

    def state_bytes(self) -> int:
        """Bytes of the optimizer state tensors (e.g. Adam's two moments) of all inner optimizers, step counters excluded."""
        return sum(
            t.numel() * t.element_size()
            for opt in self.optimizers.values() for s in opt.state.values() for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0  # not the scalar step counters
        )

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the parameters then accumulate gradients as usual)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def check_trainer_args(args) -> None:
    """Raise ``ValueError`` if ``transformers.TrainingArguments`` ask for what per-layer updates cannot do.

    Use with ``Trainer(..., optimizers=(PerLayerOptimizer(...), None))``: the Trainer builds its LR scheduler on
    the optimizer as usual and calls its (no-op) ``step()``. Global-norm clipping (``max_grad_norm > 0``) would
    see no gradients, and gradient accumulation (``gradient_accumulation_steps > 1``) would step on every
    micro-batch, so both are refused.
    """
    if getattr(args, "gradient_accumulation_steps", 1) != 1:
        raise ValueError(
            f"PerLayerOptimizer steps on every backward, so gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps} would update per micro-batch; set it to 1 (use a larger batch)."
        )
    if getattr(args, "max_grad_norm", 0) and args.max_grad_norm > 0:
        raise ValueError(
            f"PerLayerOptimizer frees each gradient as soon as it is used, so max_grad_norm={args.max_grad_norm} "
            "(clipping by the global norm) cannot work; set max_grad_norm=0 (or clip per parameter in the factory)."
        )
