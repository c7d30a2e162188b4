"""clip.py against transformers' CLIPModel: image and text encoding time with the same weights.

One process, one thread count, the same random ViT-B/32-shaped checkpoint (transformers builds and saves
it, clip.py loads that folder) and the same inputs: a batch of 224 px images (7 x 7 patches of 32 px)
and a batch of right-padded captions. Both run in eval mode under torch.no_grad(). The two alternate
run by run, so a busy neighbour slows both alike; the median of --repeats runs is reported, with the
largest difference of their outputs (they must agree, or the timing means nothing).

    python benchmarks/bench_clip.py                # CPU, 2 threads, ViT-B/32 widths with 6 layers each
    python benchmarks/bench_clip.py --layers 12    # the full ViT-B/32 depth (slower)
    python benchmarks/bench_clip.py --device cuda
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import clip  # noqa: E402


def build_checkpoint(path, layers):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                                      num_attention_heads=8, max_position_embeddings=77),
                     vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                                        num_attention_heads=12, image_size=224, patch_size=32),
                     projection_dim=512)
    CLIPModel(cfg).save_pretrained(path)


def timed(fn):
    """(seconds, result) of one call, waiting for the GPU where there is one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def compare(ours, reference, repeats):
    ours(), reference()                              # warm-up
    a, b = [], []
    for _ in range(repeats):
        t, x = timed(ours)
        a.append(t)
        t, y = timed(reference)
        b.append(t)
    return statistics.median(a), statistics.median(b), (x - y).abs().max().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6, help="layers in each tower (ViT-B/32 has 12)")
    p.add_argument("--images", type=int, default=16, help="images per batch")
    p.add_argument("--texts", type=int, default=64, help="captions per batch")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", type=str, default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import CLIPModel
    with tempfile.TemporaryDirectory() as folder:
        build_checkpoint(folder, args.layers)
        ours = clip.CLIP.from_pretrained(folder).to(args.device).eval()
        ref = CLIPModel.from_pretrained(folder).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.images, 3, 224, 224, generator=g).to(args.device)
    lengths = torch.randint(5, 40, (args.texts,), generator=g)
    ids = torch.randint(1, 49000, (args.texts, int(lengths.max())), generator=g)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    ids[torch.arange(args.texts), lengths - 1] = 49407                  # each row ends with end-of-text
    ids, mask = ids.to(args.device), mask.to(args.device)
    with torch.no_grad():
        rows = {
            f"encode {args.images} images (224 px, 50 tokens)": compare(
                lambda: ours.encode_image(pixels), lambda: ref.get_image_features(pixel_values=pixels).pooler_output,
                args.repeats),
            f"encode {args.texts} captions (5 to 39 tokens, padded)": compare(
                lambda: ours.encode_text(ids, mask),
                lambda: ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, args.repeats),
        }
    print(f"CLIP ViT-B/32 widths, {args.layers} layers per tower, {args.device}, {args.threads} threads, "
          f"torch {torch.__version__}, median of {args.repeats}\n")
    print("| step | clip.py ms | transformers ms | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for name, (a, b, diff) in rows.items():
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
