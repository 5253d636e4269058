"""Parameters of the official CollaFuse network, counted in closed form (no PyTorch needed).

  python benchmarks/efficientunet_params.py

The official CelebA code (SimeonAllmendinger/collafuse_imagen) gives the server and every client
imagen-pytorch's ``Unet`` as configured by ``configs/model/config_efficient_unet.yaml`` (UNET_64,
commit e6930f3): dim 32, dim_mults (1, 2, 4, 8), num_resnet_blocks (2, 4, 8, 8), layer_attns and
layer_cross_attns (False, True, True, True), attn_heads 8 x attn_dim_head 64, ff_mult 2,
cond_dim 512, resnet_groups 8, global-context gating, cross-embed stem (3, 7, 15), pixel-shuffle
upsampling, a final ResnetBlock, T5-v1.1-base text (768-d, max_text_len 256) pooled by a 2-layer
perceiver. The count follows the module definitions of the repository's
``src/components/model/efficient_unet.py`` layer by layer; it is what ``configs/collab.py``'s
``celeba64`` network is sized against. The frozen T5 encoder itself is not counted.
"""

DIM, MULTS = 32, (1, 2, 4, 8)
BLOCKS = (2, 4, 8, 8)
SELF_ATTN = CROSS_ATTN = (False, True, True, True)
COND, TIME, HEADS, HEAD_DIM, FF = 512, 4 * 32, 8, 64, 2
INNER = HEADS * HEAD_DIM
TEXT_DIM, MAX_TEXT, LATENTS = 768, 256, 32


def linear(i, o, bias=True):
  return i * o + (o if bias else 0)


def conv(i, o, k):
  return k * k * i * o + o


def cross_attention(d):  # ResnetBlock's CrossAttention to the text tokens (gain-only norms)
  return d + 2 * HEAD_DIM + linear(d, INNER, False) + linear(COND, 2 * INNER, False) + 2 * HEAD_DIM + linear(INNER, d, False) + d  # fmt: skip


def global_context(d):
  h = max(3, d // 2)
  return conv(d, 1, 1) + conv(d, h, 1) + conv(h, d, 1)


def resnet(di, do, *, cross=False, gca=False):
  n = linear(TIME, 2 * do) + 2 * di + conv(di, do, 3) + 2 * do + conv(do, do, 3)
  n += cross_attention(do) if cross else 0
  n += global_context(do) if gca else 0
  return n + (linear(di, do) if di != do else 0)


def transformer(d, context=True):  # multi-query self-attention (+ text K/V) and a feed-forward
  attn = d + 2 * HEAD_DIM + linear(d, INNER, False) + linear(d, 2 * HEAD_DIM, False)
  attn += 2 * HEAD_DIM + linear(INNER, d, False) + d
  attn += (2 * COND + linear(COND, 2 * HEAD_DIM)) if context else 0
  return attn + d + linear(d, FF * d, False) + FF * d + linear(FF * d, d, False)


def count() -> dict[str, int]:
  dims = [DIM] + [DIM * m for m in MULTS]
  in_out = list(zip(dims[:-1], dims[1:], strict=True))
  body = conv(3, 16, 3) + conv(3, 8, 7) + conv(3, 8, 15)  # cross-embed stem: 16 + 8 + 8 = 32
  skips = []
  for i, (di, do) in enumerate(in_out):  # encoder: each level at dim_in, then a downsample
    skips.append(di)
    body += resnet(di, di, cross=CROSS_ATTN[i])
    body += BLOCKS[i] * resnet(di, di, gca=True)
    body += transformer(di) if SELF_ATTN[i] else 0
    body += conv(4 * di, do, 1) if i < len(in_out) - 1 else conv(di, do, 3) + conv(di, do, 1)
  mid = dims[-1]
  body += 2 * resnet(mid, mid, cross=True) + transformer(mid, context=False)
  for j, (di, do) in enumerate(reversed(in_out)):  # decoder: each level at dim_out
    i, s = len(in_out) - 1 - j, skips.pop()
    body += resnet(do + s, do, cross=CROSS_ATTN[i])
    body += BLOCKS[i] * resnet(do + s, do, gca=True)
    body += transformer(do) if SELF_ATTN[i] else 0
    body += linear(do, 4 * di) if j < len(in_out) - 1 else 0  # pixel-shuffle upsample
  body += resnet(DIM, DIM, gca=True) + conv(DIM, 3, 3)
  time = 8 + linear(17, TIME) + linear(TIME, TIME) + linear(TIME, 2 * COND)

  def perceiver_layer(d):
    attn = 2 * d + 2 * d + linear(d, INNER, False) + linear(d, 2 * INNER, False) + 2 * HEAD_DIM
    return attn + linear(INNER, d, False) + 2 * d + d + linear(d, 4 * d, False) + 4 * d + linear(4 * d, d, False)  # fmt: skip

  text = 2 * COND + linear(TEXT_DIM, COND)  # norm_cond, text_to_cond
  text += 512 * COND + LATENTS * COND + COND + linear(COND, 4 * COND) + 2 * perceiver_layer(COND)
  text += MAX_TEXT * COND + TIME  # null text embedding and hidden
  text += 2 * COND + linear(COND, TIME) + linear(TIME, TIME)  # non-attention text conditioning
  return {"body": body, "time": time, "text": text, "total": body + time + text}


if __name__ == "__main__":
  c = count()
  print(
    f"U-Net body (stem, res blocks, attention with its text K/V, resampling, head): {c['body']:,}"
  )
  print(f"time embedding and time tokens: {c['time']:,}")
  print(f"text conditioning (T5 projection, perceiver pooling, null embeddings): {c['text']:,}")
  print(f"total: {c['total']:,}")
