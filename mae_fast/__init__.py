"""mae-fast: fast, exact Masked Autoencoders (He et al., 2021) for PyTorch."""
from .models_mae import (
    MODELS,
    MAEConfig,
    MaskedAutoencoderViT,
    create_model,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_tiny_patch8,
)

__version__ = "0.1.0"
__all__ = [
    "MODELS", "MAEConfig", "MaskedAutoencoderViT", "create_model", "mae_vit_base_patch16",
    "mae_vit_huge_patch14", "mae_vit_large_patch16", "mae_vit_tiny_patch8",
]
