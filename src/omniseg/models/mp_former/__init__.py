"""MP-Former: mask-piloted training of Mask2Former (training-only; inference is Mask2Former's)."""

from omniseg.models.mp_former.pilot import MaskPilot, PilotSettings

__all__ = ["MaskPilot", "PilotSettings"]
