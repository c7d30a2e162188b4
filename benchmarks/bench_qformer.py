"""qformer.py against transformers' Blip2ForImageTextRetrieval at BLIP-2's real Q-Former size.

tests/test_qformer.py proves parity on a tiny checkpoint; this script repeats it at the size people
use (BERT-base Q-Former: D = 768, 12 layers, cross-attention every 2nd, Q = 32 queries, ITC width
256) on random weights saved in transformers' format and read back by `QFormer.from_pretrained`,
then times the two forward passes retrieval needs, side by side in one process:

  ITC  logits_per_image (n_images, n_texts): the queries' pass over the image + the text's pass
  ITM  (B, 2) match logits of B (image, caption) pairs under the bidirectional mask

Both sides start from the same frozen image features (B, 257, 1408), the shape ViT-g/14 gives for a
224 x 224 image; the vision tower is left out of both (transformers' is replaced by a pass-through),
so only the Q-Former is timed. Captions are right-padded to 32 tokens, lengths 8..32.

    python benchmarks/bench_qformer.py              # about a minute of CPU
    python benchmarks/bench_qformer.py --quick      # 2 layers, a smoke test
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qformer  # noqa: E402


class PassThrough(torch.nn.Module):
    """Stands in for transformers' vision tower: `pixel_values` already are the image features."""

    def forward(self, pixel_values, **kwargs):
        return (pixel_values,)


def reference_model(layers, directory):
    """A random Blip2ForImageTextRetrieval with BLIP-2's Q-Former sizes, saved to and read from disk."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval
    torch.manual_seed(0)
    config = Blip2Config(
        # the vision tower only sets the feature width (1408, ViT-g's); one small layer keeps it cheap
        vision_config=dict(hidden_size=1408, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
                           image_size=28, patch_size=14),
        qformer_config=dict(num_hidden_layers=layers, use_qformer_text_input=True),
        num_query_tokens=32, image_text_hidden_size=256)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():   # transformers starts queries at 0 and LayerNorms at identity: shake them
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def inputs(batch, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    image_embeds = torch.nn.functional.layer_norm(torch.randn(batch, 257, 1408, generator=g), (1408,))
    ids = torch.randint(1000, vocab, (batch, 32), generator=g)
    ids[:, 0] = 101                                                     # [CLS]
    lengths = torch.linspace(8, 32, batch).long()
    mask = (torch.arange(32)[None] < lengths[:, None]).long()           # right padding
    return image_embeds, ids.masked_fill(mask == 0, 0), mask


def median_ms(fns, repeats):
    """Median ms per call of each function; calls alternate, so machine load hits both alike."""
    times = [[] for _ in fns]
    for r in range(repeats + 1):
        for fn, spent in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            if r > 0:                                                   # the first round warms up
                spent.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images = captions per forward (default 8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both (default 1)")
    p.add_argument("--quick", action="store_true", help="2 Q-Former layers and 2 repeats: checks the script")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers, repeats = (2, 2) if args.quick else (12, args.repeats)
    with tempfile.TemporaryDirectory() as directory:
        reference = reference_model(layers, directory)
        ours = qformer.QFormer.from_pretrained(directory).eval()
    reference.vision_model = PassThrough()
    image_embeds, ids, mask = inputs(args.batch, ours.config.vocab_size)
    n_weights = sum(v.numel() for k, v in ours.state_dict().items() if not k.startswith(("temp", "itg_head")))
    print(f"Q-Former D={ours.config.hidden_size}, {layers} layers, Q={ours.config.num_query_tokens}, "
          f"{n_weights / 1e6:.1f} M weights loaded; batch {args.batch}, image features {tuple(image_embeds.shape)}, "
          f"text {tuple(ids.shape)} right-padded; fp32, torch threads {args.threads}, torch {torch.__version__}")

    runs = {
        "ITC": (lambda: ours.itc_logits(image_embeds, ids, mask),
                lambda: reference(pixel_values=image_embeds, input_ids=ids, attention_mask=mask).logits_per_image),
        "ITM": (lambda: ours.itm_logits(image_embeds, ids, mask),
                lambda: reference(pixel_values=image_embeds, input_ids=ids, attention_mask=mask,
                                  use_image_text_matching_head=True).logits_per_image),
    }
    print("\n| forward | max abs difference | ours (ms, median) | transformers (ms, median) | ours / transformers |"
          "\n|---|---:|---:|---:|---:|")
    for name, (our_fn, their_fn) in runs.items():
        error = (our_fn() - their_fn()).abs().max().item()
        ms_ours, ms_theirs = median_ms([our_fn, their_fn], repeats)
        print(f"| {name} | {error:.1e} | {ms_ours:.0f} | {ms_theirs:.0f} | {ms_ours / ms_theirs:.2f}x |")


if __name__ == "__main__":
    main()
