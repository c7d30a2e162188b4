"""paligemma.py against transformers' PaliGemmaForConditionalGeneration: speed and loading memory.

Speed: one process, one thread count, the same random weights (transformers builds and saves them,
paligemma.py loads that folder) and the same inputs: a 224 px image in 14 px patches (256 image
tokens) plus a short prompt. Prefill = one forward pass over image + prompt returning the last
position's logits (what generation needs); generation = 32 greedy tokens with a KV cache, EOS off.
Each is warmed up once, then the median of --repeats runs is reported.

Memory: a bf16 checkpoint is written, then loaded in a fresh child process (so nothing else is
resident); the child reports its peak resident memory during the load minus its resident memory
just before it (Linux /proc/self/status, peak reset through /proc/self/clear_refs).

    python benchmarks/bench_paligemma.py               # CPU, 2 threads
    python benchmarks/bench_paligemma.py --device cuda
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import paligemma as pg  # noqa: E402


def hf_config(vocab, text_hidden, text_layers, text_inter, vision_layers):
    from transformers import PaliGemmaConfig
    return PaliGemmaConfig(
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=vision_layers,
                           num_attention_heads=6, image_size=224, patch_size=14, vision_use_head=False),
        text_config=dict(hidden_size=text_hidden, intermediate_size=text_inter, num_hidden_layers=text_layers,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=text_hidden // 8, vocab_size=vocab),
        image_token_index=vocab - 1, vocab_size=vocab, projection_dim=text_hidden, hidden_size=text_hidden)


def build_checkpoint(path, dtype, **sizes):
    from transformers import PaliGemmaForConditionalGeneration
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(hf_config(**sizes)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.05)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    model.save_pretrained(path)
    return model


def compare(ours, reference, repeats, device):
    """Median wall-clock and CPU seconds of each callable, and each one's last result.

    The two alternate run by run, so a busy neighbour on a shared machine slows both alike rather
    than whichever ran second. CPU time (all threads of this process) is the steadier figure when
    other processes compete for the cores; wall time is the one that matters on a quiet machine.
    """
    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - wall, time.process_time() - cpu), result
    once(ours), once(reference)   # warm-up
    runs = [(once(ours), once(reference)) for _ in range(repeats)]
    median = lambda i, j: statistics.median(r[i][0][j] for r in runs)  # noqa: E731
    return (median(0, 0), median(0, 1)), (median(1, 0), median(1, 1)), runs[-1][0][1], runs[-1][1][1]


def speed(args, device):
    from transformers import PaliGemmaForConditionalGeneration
    sizes = dict(vocab=16384, text_hidden=512, text_layers=6, text_inter=2048, vision_layers=6)
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(tmp, torch.float32, **sizes)
        hf = PaliGemmaForConditionalGeneration.from_pretrained(tmp).to(device).eval()
        ours = pg.PaliGemma.from_pretrained(tmp, device=device)
    config = ours.config
    g = torch.Generator().manual_seed(0)
    B, N = args.batch, config.num_image_tokens
    pixels = (torch.rand(B, 3, 224, 224, generator=g) * 2 - 1).to(device)
    text = torch.randint(3, 1000, (B, 20), generator=g)
    ids = torch.cat([torch.full((B, N), config.image_token_index), torch.full((B, 1), 2), text], 1).to(device)
    types = torch.zeros_like(ids)
    rows = []
    n = args.new_tokens
    with torch.inference_mode():
        t_ours, t_hf, out, ref = compare(
            lambda: ours(ids, pixels, last_only=True).logits,
            lambda: hf(input_ids=ids, pixel_values=pixels, token_type_ids=types, logits_to_keep=1).logits,
            args.repeats, device)
        rows.append(("prefill", t_ours, t_hf, f"max abs logit diff {(out - ref).abs().max().item():.1e}"))
        t_ours, t_hf, gen, ref = compare(
            lambda: ours.generate(ids, pixels, max_new_tokens=n, eos_token_id=[]).tokens,
            lambda: hf.generate(input_ids=ids, pixel_values=pixels, token_type_ids=types, max_new_tokens=n,
                                min_new_tokens=n, do_sample=False)[:, ids.shape[1]:],
            args.repeats, device)
        same = "identical" if gen.tolist() == ref.tolist() else "DIFFERENT"
        rows.append((f"generate {n} tokens (incl. prefill)", t_ours, t_hf, f"greedy tokens {same}"))
    return rows, f"{B} x ({N} image + {ids.shape[1] - N} text) tokens", sum(p.numel() for p in ours.parameters())


def rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def load_child(path, warm_up, impl):
    """Runs in a fresh process: load once, print resident KiB before, after the load and after
    touching every weight, as JSON."""
    if impl == "transformers":
        from transformers import PaliGemmaForConditionalGeneration
        load = lambda p: PaliGemmaForConditionalGeneration.from_pretrained(p, dtype=torch.bfloat16)  # noqa: E731
    else:
        load = lambda p: pg.PaliGemma.from_pretrained(p, dtype=torch.bfloat16)  # noqa: E731
    # Load a tiny checkpoint first: the first use of torch's operators pages in tens of MiB of library
    # code, which is resident memory too but has nothing to do with the checkpoint's size.
    load(warm_up)
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")   # reset the peak (VmHWM) to the current size
    model = load(path)
    loaded = rss_kib("VmHWM")
    # transformers maps the file and reads a tensor's pages only when it is first used; touch every
    # weight (as the first forward pass would) to count what is resident once the model is usable
    checksum = sum(float(p.max()) for p in model.parameters())   # reduces in bf16: no copies
    peak = rss_kib("VmHWM")
    assert next(model.parameters()).dtype == torch.bfloat16 and checksum == checksum
    print(json.dumps({"before": before, "loaded": loaded, "peak": peak}))


def memory(args):
    sizes = dict(vocab=32768, text_hidden=1024, text_layers=12, text_inter=4096, vision_layers=6)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(tmp, torch.bfloat16, **sizes)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        warm_up = Path(tmp) / "warm_up"
        build_checkpoint(warm_up, torch.bfloat16, vocab=512, text_hidden=64, text_layers=1, text_inter=128,
                         vision_layers=1)
        for impl in ("paligemma.py", "transformers"):
            out = subprocess.run([sys.executable, __file__, "--load-child", tmp, "--warm-up", str(warm_up),
                                  "--impl", impl],
                                 capture_output=True, text=True, check=True)
            numbers = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl] = [(numbers[k] - numbers["before"]) * 1024 for k in ("loaded", "peak")]
    return size, results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench_paligemma.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--load-child", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm-up", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--impl", type=str, default="paligemma.py", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_child:
        return load_child(args.load_child, args.warm_up, args.impl)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows, shape, params = speed(args, device)
    print(f"\nmid-size random PaliGemma ({params / 1e6:.1f} M parameters, fp32), {shape}, device {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}, load average {os.getloadavg()[0]:.1f}\n")
    print("| step | paligemma.py wall / CPU (s) | transformers wall / CPU (s) | speed-up wall / CPU | check |")
    print("|---|---|---|---|---|")
    for name, (ours, ours_cpu), (ref, ref_cpu), check in rows:
        print(f"| {name} | {ours:.3f} / {ours_cpu:.3f} | {ref:.3f} / {ref_cpu:.3f} | "
              f"{ref / ours:.2f}x / {ref_cpu / ours_cpu:.2f}x | {check} |")
    if not args.skip_memory:
        size, peaks = memory(args)
        print(f"\nloading a bf16 checkpoint of {size / 2**20:.0f} MiB in a fresh process: resident memory added "
              f"by the load, and after touching every weight\n")
        print("| loader | peak during load (MiB) | / size | peak after touching all weights (MiB) | / size |")
        print("|---|---|---|---|---|")
        for impl, (loaded, touched) in peaks.items():
            print(f"| {impl} | {loaded / 2**20:.0f} | {loaded / size:.2f}x | {touched / 2**20:.0f} | {touched / size:.2f}x |")


if __name__ == "__main__":
    main()
