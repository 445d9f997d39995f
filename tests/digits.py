"""Test data: scikit-learn's bundled 8x8 digits as an ImageFolder tree (train/ and val/) and a tiny MAE briefly
pretrained on it, written once in ``mae_fast.bench.probe_study`` (the study that measures what these tests hold);
the probe and k-NN tests build them once per session (conftest: ``digits_data``, ``digits_runs``)."""
from mae_fast.bench.probe_study import IMG_SIZE, PRETRAIN_EPOCHS, labelled_subset, pretrained, write_digits

SEEDS = (0, 1, 2)  # the seeds the statistical tests hold their margins on

__all__ = ["IMG_SIZE", "PRETRAIN_EPOCHS", "SEEDS", "labelled_subset", "pretrained", "write_digits"]
