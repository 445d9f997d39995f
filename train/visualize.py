"""``mae-visualize``: the paper's reconstruction panels (original, masked, reconstruction,
reconstruction + visible) for one image and a checkpoint (mae-fast or official format), captioned that the
predictions on visible patches are untrained (the loss is on masked patches only)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mae_fast.checkpoint import extract_state_dict, load_mae_checkpoint, read_checkpoint
from mae_fast.errors import ConfigError
from mae_fast.models_mae import MODELS, MaskedAutoencoderViT, create_model

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, load_rgb, normalize

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def load_image(path: str, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic), center crop, normalize: (1, 3, size, size)."""
    img = TF.resize(load_rgb(path), size, InterpolationMode.BICUBIC)
    img = TF.center_crop(img, [size, size])
    return normalize(TF.pil_to_tensor(img).unsqueeze(0))


def to_rgb(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalized → (H, W, 3) in [0, 1]."""
    return (x.cpu().float() * _STD + _MEAN).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0):
    """(masked, reconstruction, reconstruction + visible) images; norm-pix predictions are shown with
    each patch's true mean and variance (the model only predicts the normalized shape)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(imgs.shape[0], model.config.num_patches, generator=g)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    rec = model.unpatchify(pred)
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, model.config.patch_dim).float())  # 1 = removed
    gray = ((torch.full_like(imgs, 0.5) - _MEAN.to(imgs.device)) / _STD.to(imgs.device))  # mid-gray
    masked = imgs * (1 - m) + gray * m
    return masked, rec, imgs * (1 - m) + rec * m


#: the caption under the panels: the "reconstruction" panel shows the predictions on visible patches too
VISIBLE_PATCHES_NOTE = ("MAE's loss is on the masked patches only: its predictions on the visible patches are not "
                        "trained, so noise there is expected")


def draw_reconstruction(model: MaskedAutoencoderViT, image: str, mask_ratio: float = 0.75, seed: int = 0) -> Any:
    """The four-panel matplotlib figure for ``image``: the file name (and norm-pix note) above, and
    :data:`VISIBLE_PATCHES_NOTE` in one line of small text below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = load_image(image, model.img_size).to(next(model.parameters()).device)
    masked, rec, both = reconstruct(model, imgs, mask_ratio, seed)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.6))
    titles = ["original", f"masked ({mask_ratio:.0%})", "reconstruction", "reconstruction + visible"]
    for ax, x, title in zip(axes, [imgs, masked, rec, both], titles):
        ax.imshow(to_rgb(x[0]))
        ax.set_title(title)
        ax.axis("off")
    note = Path(image).name
    if model.norm_pix_loss:
        note += ("   |   norm-pix model: predicted patches are shown with the true patch mean/variance")
    fig.suptitle(note, fontsize=9)
    fig.text(0.5, 0.015, VISIBLE_PATCHES_NOTE, ha="center", va="bottom", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def reconstruction_figure(model: MaskedAutoencoderViT, image: str, out: str | Path, mask_ratio: float = 0.75,
                          seed: int = 0) -> Path:
    """Write the four-panel PNG for ``image`` (:func:`draw_reconstruction`) and return its path."""
    import matplotlib.pyplot as plt

    fig = draw_reconstruction(model, image, mask_ratio, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def model_from_checkpoint(path: str, model_name: Optional[str] = None, norm_pix_loss: Optional[bool] = None,
                          img_size: Optional[int] = None) -> MaskedAutoencoderViT:
    """Build the model a checkpoint describes (mae-fast ``config`` or official ``args``) and load it."""
    ckpt = read_checkpoint(path)
    cfg = ckpt.get("config") or {}
    args = vars(ckpt["args"]) if "args" in ckpt and hasattr(ckpt["args"], "__dict__") else {}
    name = model_name or cfg.get("model") or args.get("model")
    if name is None:
        raise ConfigError(f"checkpoint {path}: it does not name its model; pass --model ({', '.join(sorted(MODELS))})")
    npl = norm_pix_loss if norm_pix_loss is not None else cfg.get("norm_pix_loss", args.get("norm_pix_loss", False))
    sd = extract_state_dict(ckpt, path)
    size = img_size or cfg.get("img_size") or args.get("input_size")
    if size is None and "pos_embed" in sd and "patch_embed.proj.weight" in sd:
        size = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5)) * sd["patch_embed.proj.weight"].shape[-1]
    model = create_model(name, norm_pix_loss=bool(npl), **({"img_size": int(size)} if size else {}))
    report = load_mae_checkpoint(model, ckpt if not isinstance(ckpt, dict) else {"model": sd})
    if report.encoder_only:
        raise ConfigError(f"checkpoint {path}: encoder-only (no decoder weights), it cannot reconstruct; "
                         f"use a full checkpoint (e.g. the official *_full.pth or mae_visualize_*.pth)")
    return model


def main(argv: Optional[List[str]] = None) -> int:
    from .engine.cli import Parser, run_main

    p = Parser(prog="mae-visualize", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="mae-fast or official MAE checkpoint with the decoder, "
                   "or a Hugging Face ViTMAE folder")
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--model", choices=sorted(MODELS), help="model name, if the checkpoint does not say")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the model was trained with norm-pix loss (default: from the checkpoint)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed (default: 0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask (default: 0)")

    def run(a: argparse.Namespace) -> None:
        if not 0.0 < a.mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio {a.mask_ratio}: must be in (0, 1)")
        model = model_from_checkpoint(a.checkpoint, a.model, a.norm_pix_loss)
        if not Path(a.image).is_file():
            raise ConfigError(f"--image {a.image}: no such file")
        print(reconstruction_figure(model, a.image, a.out, a.mask_ratio, a.seed))

    return run_main("mae-visualize", lambda: p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
