"""SAM and its variants as torch.optim optimizers: the SAM optimizer, the step driver with m-sharpness
under data parallelism, and the cheaper variants.

Offers: `SAM` (sam), `sam_step` (step), and the variants: `SAMVariant`, `make_variant`,
`variant_from_config`, `FullSAM`, `EveryKSAM`, `RandomizedSAM`, `LookSAM`, `AESAM`, `VARIANTS`
(variants). Kept: the ascent that moves the weights to w + eps (ascent), `SAM.step(closure)`
under a variant (closure_step), the variant an optimizer follows and its checkpoint state
(attached), the m-sharpness and data-parallel passes (msharpness), and the MSAM and SAMPa steps
(msam, sampa).
"""

from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)
