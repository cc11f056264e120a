"""DATM's sequential generation: the upper bound of the start epochs grows during training."""

from __future__ import annotations

from typing import Any

import lightning as L


class StartEpochSchedule(L.Callback):
    """Grow the upper bound of the start epochs linearly (DATM's "sequential generation").

    Before every step, the module's ``upper_start_epoch`` is set to
    ``current_max_start_epoch + (max_start_epoch - current_max_start_epoch) * min(1, step /
    expansion_end)`` (rounded down): early steps match easy, early-trajectory segments, later
    steps harder ones. The bound is part of the callback's ``state_dict``, so a run resumed with
    ``--ckpt_path`` continues the schedule where it was.

    Args:
        current_max_start_epoch: The bound at step 0.
        max_start_epoch: The bound from ``expansion_end`` on.
        expansion_end: Steps over which the bound grows (0: ``max_start_epoch`` from the start).
    """

    def __init__(self, current_max_start_epoch: int, max_start_epoch: int, expansion_end: int) -> None:
        if not 0 < current_max_start_epoch <= max_start_epoch:
            raise ValueError(f"need 0 < current_max_start_epoch <= max_start_epoch, got "
                             f"{current_max_start_epoch} and {max_start_epoch}")
        if expansion_end < 0:
            raise ValueError(f"expansion_end must be >= 0, got {expansion_end}")
        self.current_max_start_epoch = current_max_start_epoch
        self.max_start_epoch = max_start_epoch
        self.expansion_end = expansion_end
        self.upper = current_max_start_epoch if expansion_end else max_start_epoch
        self.history: list[tuple[int, int]] = []  # (step, bound) whenever the bound changes

    def bound(self, step: int) -> int:
        """The bound at ``step``."""
        if not self.expansion_end or step >= self.expansion_end:
            return self.max_start_epoch
        span = self.max_start_epoch - self.current_max_start_epoch
        return self.current_max_start_epoch + (span * step) // self.expansion_end

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        upper = self.bound(trainer.global_step)
        if upper != self.upper or not self.history:
            self.history.append((trainer.global_step, upper))
        self.upper = upper
        pl_module.upper_start_epoch = upper

    def state_dict(self) -> dict[str, Any]:
        return {"upper": self.upper, "history": list(self.history),
                "settings": [self.current_max_start_epoch, self.max_start_epoch, self.expansion_end]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        settings = [self.current_max_start_epoch, self.max_start_epoch, self.expansion_end]
        if state_dict.get("settings") != settings:
            raise ValueError(f"the checkpoint's start-epoch schedule {state_dict.get('settings')} "
                             f"differs from this run's {settings}")
        self.upper = state_dict["upper"]
        self.history = [tuple(h) for h in state_dict["history"]]
