"""NOLA (Koohpayegani et al., ICLR 2024): LoRA factors as linear combinations of frozen seeded random bases."""

from ..._peft_compat import register_method
from .config import NolaConfig
from .layer import NolaLayer
from .model import NolaModel

register_method("nola", NolaConfig, NolaModel)

__all__ = ["NolaConfig", "NolaLayer", "NolaModel"]
