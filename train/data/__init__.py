"""Data: image sources, the MAE augmentation, and the loaders (PIL, DALI, nvJPEG, tar shards) behind ``build_loader``."""
