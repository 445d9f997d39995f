"""Masked Autoencoder with a ViT backbone, exact to the official code (see docs/semantics.md §3, §10).

Names, public methods and ``state_dict`` keys follow facebookresearch/mae ``models_mae.py`` so that
official checkpoints load unchanged and code calling ``forward_encoder`` / ``forward_decoder`` /
``forward_loss`` / ``patchify`` / ``unpatchify`` ports as is. What differs is only *how* it is
computed: the encoder embeds just the visible patches (gather, then one GEMM) instead of embedding
every patch and throwing 75% away, and attention goes through a pluggable backend. A model also takes
images of another size (``set_input_size``, for progressive resolution): their position tables are the
official sin-cos tables of that grid, while ``pos_embed`` / ``decoder_pos_embed`` (and so every
checkpoint) stay those of ``img_size``. Three steps run
as fused Triton kernels on CUDA (``kernel_backend``): visible-patch embedding (gather + GEMM + pos),
decoder unshuffle with the mask token, and the masked normalized-pixel loss; their plain PyTorch
references (in ``mae_fast.kernels``) are the CPU path and the specification.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from torch.utils.checkpoint import checkpoint

from mae_fast.kernels import KERNEL_BACKENDS, masked_loss, patch_embed_gather, unshuffle_mask_tokens
from mae_fast.kernels._utils import patchify_reference

from .attention import AttentionSite, get_attention, pick_attention_backend
from .pos_embed import get_2d_sincos_pos_embed

log = logging.getLogger(__name__)

LN_EPS = 1e-6


@dataclass(frozen=True)
class MAEConfig:
    """Shape of a MAE model: everything the FLOPs counter and checkpoints need to know."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    def to_dict(self) -> dict:
        return asdict(self)


class PatchEmbed(nn.Module):
    """Stride-p convolution (key ``proj``, as timm's) whose weight also serves a GEMM on patches.

    The conv weight is (D, C, p, p); ``weight_in_patch_order`` views it as the (D, C*p*p) matrix in
    its own (c, py, px) order, the order ``patch_embed_gather`` reads patch pixels in, so one GEMM on
    gathered patches equals conv-then-gather (no permuted copy of the weight).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def weight_in_patch_order(self) -> torch.Tensor:
        """Conv weight as a (D, C*p*p) matrix in its (c, py, px) order: a view (no copy) when contiguous."""
        w = self.proj.weight
        return w.reshape(w.shape[0], -1)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """All patches, as the official code: (N, C, H, W) -> (N, L, D)."""
        return self.proj(imgs).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear (columns q|k|v, then heads)."""

    def __init__(self, dim: int, num_heads: int, attn_backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_backend = attn_backend
        self._attend = get_attention(attn_backend)

    def set_backend(self, attn_backend: str) -> None:
        self._attend = get_attention(attn_backend)
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        return self.proj(self._attend(qkv).reshape(B, N, C))


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


#: ``set_input_size`` position tables at another input size: the official code's for that grid, or scaled to
#: ``img_size``'s grid (each patch's centre in its units)
INPUT_POSITIONS = ("official", "scaled")

#: ``set_activation_dtype`` names: the residual stream's dtype between blocks (None: as autocast leaves it)
ACTIVATION_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(LN(x)); x += mlp(LN(x)). No dropout, no drop path.

    ``checkpointed``: recompute this block's activations in backward (inside ``forward``, so a
    compiled block traces the checkpoint too). ``residual_dtype``: keep the residual stream in this
    dtype (bf16 halves the activations kept between blocks); None keeps autocast's float32 sums.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.checkpointed = False
        self.residual_dtype: Optional[torch.dtype] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and self.training and torch.is_grad_enabled():
            return checkpoint(self._residual_stream, x, use_reentrant=False)
        return self._residual_stream(x)

    def _residual_stream(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.residual_dtype
        if dt is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x.to(dt)
        x = x + self.attn(self.norm1(x)).to(dt)
        return x + self.mlp(self.norm2(x)).to(dt)


class MaskedAutoencoderViT(nn.Module):
    """MAE: ViT encoder on the visible patches, light decoder with a learned mask token."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        attn_backend: str = "sdpa",
        kernel_backend: str = "auto",
    ):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(
                f"img_size {img_size} is not a multiple of patch_size {patch_size} "
                f"({img_size} / {patch_size} = {img_size / patch_size:g})"
            )
        self.config = MAEConfig(
            img_size, patch_size, in_chans, embed_dim, depth, num_heads,
            decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, norm_pix_loss,
        )
        self.img_size = img_size
        self.input_size = img_size  # the side of the images it takes now (set_input_size)
        self.input_positions = "official"  # the position tables at another input size (set_input_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        num_patches = self.config.num_patches
        concrete = "sdpa" if attn_backend == "auto" else attn_backend

        # encoder
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, concrete) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, concrete) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.config.patch_dim)

        self.grad_checkpointing = 0  # 0: off; k: checkpoint every k-th block (activation memory)
        self.activation_dtype = "fp32"  # residual stream between blocks (set_activation_dtype)
        self.attn_choices: Dict[str, dict] = {}  # per site: backend and why (set_attn_backend)
        self.kernel_failures: Dict[str, str] = {}  # op: why its self-test failed (check_kernels)
        self._grid_tables: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}  # (grid, device, dtype): tables
        self.set_kernel_backend(kernel_backend)
        self.initialize_weights()
        if attn_backend == "auto":
            self.set_attn_backend("auto")

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Official init: fixed sin-cos tables, xavier_uniform Linears/patch embed, tokens N(0, 0.02)."""
        g = self.config.grid_size
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], g, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        dec_pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], g, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec_pos).float().unsqueeze(0))

        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def attention_sites(self, batch: int = 64, mask_ratio: float = 0.75) -> Dict[str, Tuple[nn.ModuleList, AttentionSite]]:
        """{"encoder" | "decoder": (its blocks, its attention shape)}: 1 + visible tokens, 1 + L tokens."""
        sites = {}
        for name, blocks, tokens in (("encoder", self.blocks, 1 + self.num_visible(mask_ratio)),
                                     ("decoder", self.decoder_blocks, 1 + self.input_patches)):
            if len(blocks):
                attn = blocks[0].attn
                sites[name] = (blocks, AttentionSite(batch, tokens, attn.num_heads, attn.head_dim))
        return sites

    def set_attn_backend(self, attn_backend: str, dtype: Optional[torch.dtype] = None, batch: int = 64,
                         mask_ratio: float = 0.75) -> Dict[str, str]:
        """Set the attention backend (see ``mae_fast.attention``) of the encoder and decoder blocks;
        returns {site: backend}, also kept with the reasons in ``attn_choices`` (for records).

        "auto" times the candidates per site at its real shape (``batch`` images, ``mask_ratio``) on
        the model's device in ``dtype`` (default bf16 on CUDA), so encoder and decoder may differ; call
        it after moving the model to its device. On CPU it is plain SDPA, nothing timed.
        """
        if attn_backend != "auto":
            get_attention(attn_backend)  # an unknown name: ValueError listing the known ones
        device = self.cls_token.device
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.attn_choices: Dict[str, dict] = {}
        for name, (blocks, site) in self.attention_sites(batch, mask_ratio).items():
            if attn_backend == "auto":
                choice = pick_attention_backend(device, dtype, site, site_name=name).to_dict()
            else:
                choice = {"backend": attn_backend, "tokens": site.tokens, "heads": site.heads,
                          "head_dim": site.head_dim, "forced": True}
            for blk in blocks:
                blk.attn.set_backend(choice["backend"])
            self.attn_choices[name] = choice
        return {name: c["backend"] for name, c in self.attn_choices.items()}

    def set_activation_dtype(self, name: str = "fp32") -> None:
        """Residual stream between blocks kept in fp32 (as autocast leaves it: exact to the official
        code) or "bf16" (less activation memory and traffic, bf16 sums; use under bf16 autocast)."""
        if name not in ACTIVATION_DTYPES:
            raise ValueError(f"unknown activation dtype {name!r}; choose one of {list(ACTIVATION_DTYPES)}")
        for blk in [*self.blocks, *self.decoder_blocks]:
            blk.residual_dtype = ACTIVATION_DTYPES[name]
        self.activation_dtype = name

    def set_kernel_backend(self, kernel_backend: str) -> None:
        """"auto": Triton kernels on CUDA tensors, PyTorch elsewhere; "triton": always (CPU tensors need
        TRITON_INTERPRET=1); "torch": the plain PyTorch references."""
        if kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"unknown kernel_backend {kernel_backend!r}; choose one of {list(KERNEL_BACKENDS)}")
        self.kernel_backend = kernel_backend

    def check_kernels(self, force: bool = False, dtype: torch.dtype = torch.bfloat16) -> str:
        """With kernel_backend "auto" on CUDA (or ``force``): self-test the Triton ops on the model's
        device once, computing in ``dtype`` (the run's: ``mae_fast.device.compute_dtype``); if one fails,
        use the PyTorch references and warn naming the op (kept in ``kernel_failures``). Returns the backend."""
        device = self.cls_token.device
        self.kernel_failures = {}
        if self.kernel_backend != "auto" or (device.type != "cuda" and not force):
            return self.kernel_backend
        from mae_fast.kernels.selftest import selftest

        c = self.config
        failed = {op: why for op, why in
                  selftest(device, c.patch_size, c.embed_dim, c.decoder_embed_dim, dtype).items() if why}
        self.kernel_failures = failed
        if failed:
            log.warning("Triton kernels failed their self-test on %s (%s); using the PyTorch references "
                        "(kernel_backend='torch')", device, "; ".join(f"{k}: {v}" for k, v in failed.items()))
            self.kernel_backend = "torch"
        return self.kernel_backend

    def set_grad_checkpointing(self, every: int = 1) -> None:
        """Recompute activations of every ``every``-th block (of the encoder and of the decoder) in
        backward (0 turns it off)."""
        if every < 0:
            raise ValueError(f"grad checkpointing interval must be >= 0, got {every}")
        self.grad_checkpointing = every
        for blocks in (self.blocks, self.decoder_blocks):
            for i, blk in enumerate(blocks):
                blk.checkpointed = bool(every) and i % every == 0

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:  # each block checkpoints itself (set_grad_checkpointing)
            x = blk(x)
        return x

    # ------------------------------------------------------- input size
    @property
    def input_patches(self) -> int:
        """Patches L of the images the model takes now (``input_size``)."""
        return (self.input_size // self.patch_size) ** 2

    def set_input_size(self, size: int, positions: Optional[str] = None) -> None:
        """Take ``size`` px images from now on (progressive resolution): the masking draws over its grid, and the
        position tables are that grid's sin-cos tables, computed as the official code computes them for a model
        of that size (``positions`` "official"), or at each patch's centre in ``img_size``'s grid ("scaled": a
        code stays tied to a place in the image). The parameters, and so checkpoints, keep ``img_size``'s
        tables. ``positions`` None keeps the current choice."""
        if size < self.patch_size or size % self.patch_size:
            raise ValueError(f"input size {size} px is not a multiple of the patch size {self.patch_size}")
        if positions is not None and positions not in INPUT_POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose one of {list(INPUT_POSITIONS)}")
        self.input_size = int(size)
        self.input_positions = positions or self.input_positions

    @contextlib.contextmanager
    def input_size_as(self, size: int) -> Iterator[None]:
        """Take ``size`` px images inside the block (e.g. an evaluation at the final size mid-schedule)."""
        before = self.input_size
        self.set_input_size(size)
        try:
            yield
        finally:
            self.input_size = before

    def position_tables(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(encoder, decoder) position tables (1, 1 + L, D) of the current input grid: the parameters at
        ``img_size``, else that grid's sin-cos tables (``input_positions``) in the parameters' dtype and device
        (cached)."""
        if self.input_size == self.img_size:
            return self.pos_embed, self.decoder_pos_embed
        grid = self.input_size // self.patch_size
        span = self.config.grid_size if self.input_positions == "scaled" else None
        dtype, device = self.pos_embed.dtype, self.cls_token.device
        key = (grid, span, device, dtype)
        if key not in self._grid_tables:
            self._grid_tables[key] = tuple(
                torch.from_numpy(get_2d_sincos_pos_embed(dim, grid, cls_token=True, span=span)).float()
                .unsqueeze(0).to(device, dtype) for dim in (self.pos_embed.shape[-1], self.decoder_pos_embed.shape[-1]))
        return self._grid_tables[key]

    # ---------------------------------------------------------- layout utils
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, p*p*3); patches row-major, (py, px, c) inside a patch."""
        return patchify_reference(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*3) -> (N, 3, H, W); the exact inverse of ``patchify`` for square grids."""
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"unpatchify needs a square number of patches, got {x.shape[1]}")
        C = x.shape[2] // (p * p)
        x = x.reshape(x.shape[0], h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], C, h * p, w * p)

    # ------------------------------------------------------------- checks
    def check_images(self, imgs: torch.Tensor) -> None:
        """Raise ValueError naming the numbers if ``imgs`` is not (N, in_chans, input_size, input_size)."""
        if imgs.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got a {imgs.dim()}-D tensor {tuple(imgs.shape)}")
        N, C, H, W = imgs.shape
        p = self.patch_size
        if C != self.in_chans:
            raise ValueError(f"images have {C} channels; this model takes {self.in_chans} (shape {tuple(imgs.shape)})")
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        if H != self.input_size or W != self.input_size:
            if self.input_size != self.img_size:
                raise ValueError(f"image size {H}x{W} does not match the model's input size {self.input_size}x"
                                 f"{self.input_size} (set_input_size; img_size {self.img_size})")
            raise ValueError(
                f"image size {H}x{W} does not match the model's img_size {self.img_size}x{self.img_size} "
                f"(its position table has {self.config.num_patches} patches); build the model with "
                f"img_size={H} or resize the images"
            )
        if N == 0:
            raise ValueError("got an empty batch (N = 0)")

    def num_visible(self, mask_ratio: float) -> int:
        """len_keep = int(L * (1 - mask_ratio)), validated: ValueError unless 0 < ratio < 1 and >= 1 kept."""
        L = self.input_patches
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        len_keep = int(L * (1 - mask_ratio))
        if len_keep < 1:
            raise ValueError(
                f"mask_ratio {mask_ratio} leaves no visible patch: int({L} * (1 - {mask_ratio})) = {len_keep}"
            )
        return len_keep

    # ------------------------------------------------------------ masking
    def masking_ids(
        self, N: int, mask_ratio: float, noise: Optional[torch.Tensor] = None, device=None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking from ``noise`` (N, L) (small noise = kept).

        Returns ids_keep (N, len_keep) in noise order, mask (N, L) float32 in patch order with
        1 = removed, and ids_restore (N, L) = argsort(ids_shuffle).
        """
        L = self.input_patches
        len_keep = self.num_visible(mask_ratio)
        if noise is None:
            noise = torch.rand(N, L, device=device)
        elif tuple(noise.shape) != (N, L):
            raise ValueError(f"noise must have shape (N, L) = ({N}, {L}), got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = (ids_restore >= len_keep).to(torch.float32)
        return ids_keep, mask, ids_restore

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Official API: keep tokens of ``x`` (N, L, D); returns (x_masked, mask, ids_restore)."""
        N, L, D = x.shape
        ids_keep, mask, ids_restore = self.masking_ids(N, mask_ratio, noise, x.device)
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------ encoder
    def embed_visible(
        self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masking + embedding of the visible patches: (tokens (N, 1+len_keep, D), cls first; mask; ids_restore)."""
        self.check_images(imgs)
        ids_keep, mask, ids_restore = self.masking_ids(imgs.shape[0], mask_ratio, noise, imgs.device)

        # embed only the visible patches: gather raw patches, one GEMM, + their position rows
        # (equals the official embed-all, add pos, then gather)
        pos_embed, _ = self.position_tables()
        x = patch_embed_gather(imgs, ids_keep, self.patch_embed.weight_in_patch_order(), self.patch_embed.proj.bias,
                               pos_embed[0, 1:], self.patch_size, backend=self.kernel_backend)

        cls_tokens = (self.cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat((cls_tokens, x), dim=1), mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Visible patches -> (latent (N, 1+len_keep, D), mask (N, L), ids_restore (N, L))."""
        x, mask, ids_restore = self.embed_visible(imgs, mask_ratio, noise)
        x = self._run_blocks(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder on all patches in spatial order, no masking: (N, 1+L, D), as timm's ViT."""
        self.check_images(imgs)
        pos_embed, _ = self.position_tables()
        x = self.patch_embed(imgs) + pos_embed[:, 1:]
        cls_tokens = (self.cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    # ------------------------------------------------------------ decoder
    def embed_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent (N, 1+len_keep, D) -> decoder tokens (N, 1+L, Dd): every patch in patch order, cls first."""
        x = self.decoder_embed(latent)
        # append mask tokens, unshuffle to patch order with ids_restore, cls first, + decoder positions
        return unshuffle_mask_tokens(x, self.mask_token, ids_restore, self.position_tables()[1],
                                     backend=self.kernel_backend)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent (N, 1+len_keep, D) -> predictions (N, L, p*p*3) for every patch."""
        x = self.embed_decoder(x, ids_restore)

        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    # --------------------------------------------------------------- loss
    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked patches; with norm_pix_loss the target is each patch
        normalized by its own mean and unbiased variance (eps 1e-6). Computed in float32 at least
        (bf16/fp16 predictions are upcast; float64 stays float64)."""
        return masked_loss(pred, imgs, mask, self.patch_size, self.norm_pix_loss, backend=self.kernel_backend)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (N, L, p*p*3), mask (N, L) with 1 = removed)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# ------------------------------------------------------------------ factories
MODEL_CONFIGS = {
    # tiny model for tests and CPU demos: 64 px, patch 8 (64 patches), 96-d x 4, decoder 64-d x 2
    "mae_vit_tiny_patch8": dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                                decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2),
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


#: the official code's factory names (as saved in its checkpoints' ``args.model``)
OFFICIAL_NAMES = {f"{name}_dec512d8b": name for name in MODEL_CONFIGS if name != "mae_vit_tiny_patch8"}


def create_model(name: str, cls: type = MaskedAutoencoderViT, **kwargs) -> MaskedAutoencoderViT:
    """Build model ``name`` (a key of ``MODEL_CONFIGS``, or an official ``*_dec512d8b`` name), keyword
    arguments overriding its shape."""
    try:
        defaults = MODEL_CONFIGS[OFFICIAL_NAMES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}") from None
    return cls(**{**defaults, **kwargs})


def mae_vit_tiny_patch8(**kwargs) -> MaskedAutoencoderViT:
    """Tiny model for tests and CPU demos: 64 px, patch 8 (64 patches), 96-d x 4, decoder 64-d x 2."""
    return create_model("mae_vit_tiny_patch8", **kwargs)


def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-B/16 encoder (768-d, 12 blocks, 12 heads), 512-d x 8 decoder."""
    return create_model("mae_vit_base_patch16", **kwargs)


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-L/16 encoder (1024-d, 24 blocks, 16 heads), 512-d x 8 decoder."""
    return create_model("mae_vit_large_patch16", **kwargs)


def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-H/14 encoder (1280-d, 32 blocks, 16 heads of 80), 512-d x 8 decoder."""
    return create_model("mae_vit_huge_patch14", **kwargs)


# official aliases
mae_vit_base_patch16_dec512d8b = mae_vit_base_patch16
mae_vit_large_patch16_dec512d8b = mae_vit_large_patch16
mae_vit_huge_patch14_dec512d8b = mae_vit_huge_patch14

MODELS = {
    "mae_vit_tiny_patch8": mae_vit_tiny_patch8,
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
}
