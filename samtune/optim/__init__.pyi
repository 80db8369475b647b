# Generated from samtune._lazy.FACES by samtune._lazy.stub: do not edit.

from samtune.optim.sam import SAM as SAM
from samtune.optim.step import sam_step as sam_step
from samtune.optim.variants import AESAM as AESAM
from samtune.optim.variants import EveryKSAM as EveryKSAM
from samtune.optim.variants import FullSAM as FullSAM
from samtune.optim.variants import LookSAM as LookSAM
from samtune.optim.variants import RandomizedSAM as RandomizedSAM
from samtune.optim.variants import SAMVariant as SAMVariant
from samtune.optim.variants import VARIANTS as VARIANTS
from samtune.optim.variants import make_variant as make_variant
from samtune.optim.variants import variant_from_config as variant_from_config

__all__ = ['AESAM', 'EveryKSAM', 'FullSAM', 'LookSAM', 'RandomizedSAM', 'SAM', 'SAMVariant', 'VARIANTS', 'make_variant', 'sam_step', 'variant_from_config']
