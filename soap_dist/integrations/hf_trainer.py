"""The HF Trainer under DDP: SOAP's ``state_dict()`` is a collective, the Trainer calls it on one rank.

``transformers.Trainer`` saves ``optimizer.state_dict()`` only on the process that writes the
checkpoint (``args.should_save``); under DDP, SOAP's state is spread over the ranks (each factor's
statistics live at its owner), so that lone call waits for ranks that have gone on training, until
``collective_timeout``. ``save_callback()`` runs the collective on every rank just before the
Trainer saves (``SOAP.hold_state_dict``), so the saving rank's call then needs no other rank.

transformers is imported when ``save_callback`` is called, never with soap_dist.
"""

from __future__ import annotations

from typing import Any

from ..optimizer import SOAP


def soap_inside(optimizer: Any) -> SOAP | None:
    """The SOAP under Accelerate's (or any) wrapper that keeps the wrapped one as ``.optimizer``."""
    for _ in range(8):
        if isinstance(optimizer, SOAP) or optimizer is None:
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def saves_on_one_rank(soap: SOAP) -> bool:
    """Whether the Trainer will call ``soap.state_dict()`` on the saving rank alone while SOAP needs
    every rank: DDP (placement replicated). Under DeepSpeed and FSDP the Trainer saves through
    DeepSpeed's engine and Accelerate's FSDP helpers, which call it on every rank."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState()
    if any(getattr(state, plugin, None) is not None for plugin in ("deepspeed_plugin", "fsdp_plugin")):
        return False
    where = soap._placement
    return soap._zero is None and where is not None and where.topology.placement == "replicated"


def save_callback() -> Any:
    """A ``transformers.TrainerCallback`` for ``Trainer(callbacks=[...])``: needed under DDP with more
    than one process whenever the Trainer saves checkpoints (``save_steps``, ``save_strategy``);
    elsewhere (one process, DeepSpeed, FSDP) it does nothing. It sees the ``should_save`` that the
    callbacks before it set (the Trainer's own come first)."""
    from transformers import TrainerCallback

    class SOAPSaveCallback(TrainerCallback):
        """Before each save the Trainer decided on (after a step or an epoch, or after an evaluation
        under ``save_strategy="best"``), every rank runs SOAP's state_dict collective; the saving
        rank keeps the result for the Trainer's own call."""

        def _hold(self, args: Any, optimizer: Any) -> None:
            soap = soap_inside(optimizer)
            if soap is not None and not args.save_only_model and saves_on_one_rank(soap):
                soap.hold_state_dict(keep=bool(args.should_save))

        def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            # "best" decides whether to save after the evaluation, once callbacks have run: hold then too
            if control.should_save or (args.save_strategy == "best" and control.should_evaluate):
                self._hold(args, optimizer)

        def on_epoch_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            self.on_step_end(args, state, control, optimizer=optimizer, **kw)

    return SOAPSaveCallback()
