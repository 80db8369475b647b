"""The SAM variant an optimizer follows, and a checkpoint's variant state that arrived before it
(a trainer that restores the optimizer first and passes the variant to `sam_step` afterwards):
the state waits here and the variant resumes from it once attached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from samtune.optim.variants import SAMVariant, as_variant


class AttachedVariant:
    """One optimizer's variant (None: every step takes both passes) and its waiting state."""

    def __init__(self) -> None:
        self.variant: SAMVariant | None = None
        self.pending_state: dict | None = None

    def attach(self, variant: SAMVariant | str | Mapping[str, Any]) -> SAMVariant:
        """See `samtune.optim.sam.SAM.use_variant`."""
        new = as_variant(variant)
        current = self.variant
        if current is None:
            if self.pending_state is not None:
                new.load_state_dict(self.pending_state)
                self.pending_state = None
            self.variant = new
            return new
        if new is not current and (new.name, new.settings()) != (current.name, current.settings()):
            raise ValueError(
                f"this optimizer already follows {current!r}; a run keeps one SAM "
                f"variant (got {new!r}): build a new SAM optimizer to change it"
            )
        return current

    def active(self) -> SAMVariant | None:
        """The variant to follow now; ValueError where a checkpoint of another one waits."""
        if self.variant is None and self.pending_state is not None:
            name = self.pending_state.get("name")
            if name != "full":
                raise ValueError(
                    f"the loaded checkpoint follows sam_variant={name!r}; pass the same "
                    f"variant (SAM(variant=...) or sam_step(variant=...)) to resume it"
                )
        return self.variant

    def state_dict(self) -> dict | None:
        if self.variant is not None:
            return self.variant.state_dict()
        return self.pending_state

    def load_state_dict(self, state: dict) -> None:
        if self.variant is not None:
            self.variant.load_state_dict(state)
        else:
            self.pending_state = state
