"""The official MAE forward pass, transcribed from docs/semantics.md §1-§4 for tests.

It runs on an mae-fast model's parameters but computes the official way: conv-embed every patch,
add the position table, then gather the kept tokens; mask built with ones/zeros and a gather;
plain softmax attention. The fast model must match it.
"""
import torch
import torch.nn.functional as F


def patchify(imgs, p):
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def random_masking(x, mask_ratio, noise):
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def block(blk, x):
    B, N, C = x.shape
    a = blk.attn
    h = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    qkv = F.linear(h, a.qkv.weight, a.qkv.bias).reshape(B, N, 3, a.num_heads, C // a.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (C // a.num_heads) ** -0.5
    attn = attn.softmax(dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(h, a.proj.weight, a.proj.bias)
    h = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    h = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + h


def official_forward(m, imgs, mask_ratio, noise):
    """(loss, pred, mask) exactly as facebookresearch/mae computes them."""
    p = m.patch_size
    x = F.conv2d(imgs, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    x = x + m.pos_embed[:, 1:, :]
    x, mask, ids_restore = random_masking(x, mask_ratio, noise)
    cls = m.cls_token + m.pos_embed[:, :1, :]
    x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in m.blocks:
        x = block(blk, x)
    x = F.layer_norm(x, (x.shape[-1],), m.norm.weight, m.norm.bias, 1e-6)

    x = F.linear(x, m.decoder_embed.weight, m.decoder_embed.bias)
    mask_tokens = m.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = block(blk, x)
    x = F.layer_norm(x, (x.shape[-1],), m.decoder_norm.weight, m.decoder_norm.bias, 1e-6)
    pred = F.linear(x, m.decoder_pred.weight, m.decoder_pred.bias)[:, 1:, :]

    target = patchify(imgs, p)
    if m.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss, pred, mask
