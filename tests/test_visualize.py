"""mae-visualize's figure (also written at the end of ``mae-pretrain --demo``): four panels, the file name above and,
below, the caption that the predictions on visible patches are untrained. Checkpoint reading: tests/test_pretrain.py."""
from pathlib import Path

import torch

from mae_fast import mae_vit_tiny_patch8
from mae_fast.train.data.sources import demo_dir
from mae_fast.train.visualize import VISIBLE_PATCHES_NOTE, draw_reconstruction, reconstruction_figure


def test_figure_says_visible_patch_predictions_are_untrained(tmp_path):
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    model = mae_vit_tiny_patch8()
    image = str(sorted(demo_dir().glob("*.jpg"))[0])
    fig = draw_reconstruction(model, image)
    try:
        texts = [t.get_text() for t in fig.texts]
        assert fig._suptitle.get_text() == Path(image).name
        assert texts.count(VISIBLE_PATCHES_NOTE) == 1 and "\n" not in VISIBLE_PATCHES_NOTE
        assert "masked patches only" in VISIBLE_PATCHES_NOTE
        assert "visible patches are not trained" in VISIBLE_PATCHES_NOTE
        assert [ax.get_title() for ax in fig.axes] == ["original", "masked (75%)", "reconstruction",
                                                       "reconstruction + visible"]
    finally:
        plt.close(fig)
    out = reconstruction_figure(model, image, tmp_path / "fig" / "rec.png")
    assert out == tmp_path / "fig" / "rec.png" and out.stat().st_size > 0
