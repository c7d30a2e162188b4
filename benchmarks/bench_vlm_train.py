"""vlm_train.py's five connectors x three stage-2 modes on the same shapes VQA task, in one table.

Every run shares one cache (the shapes ViT of clip.py, the rendered data, the text-only LM), and the
three stage-2 modes of a connector share its stage 1. Each (connector, mode) runs in a fresh process
(forked from a server that imported vlm_train once), so its peak RSS is its own. The schedule is
shorter than `vlm_train.py --train`'s (see --stage1-steps / --stage2-steps, printed with the table),
so the accuracies are lower than --train's; the comparison between rows is the point.

    python benchmarks/bench_vlm_train.py                       # CPU, the default model, short schedule
    python benchmarks/bench_vlm_train.py --tiny --out /tmp/b   # seconds: the tiny model (a smoke test)
"""
import argparse
import multiprocessing as mp
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import vlm_train as vt  # noqa: E402


def one_run(connector, mode, args):
    """Stage 1 (shared per connector), stage 2, evaluation; returns the row of the table."""
    import lora
    torch.set_num_threads(args.threads)
    lora.return_freed_memory_to_the_os()
    start_rss = lora.peak_rss_bytes()
    vcfg = (vt.VLMConfig.tiny if args.tiny else vt.VLMConfig)(connector=connector)
    tcfg = (vt.TrainConfig.tiny if args.tiny else vt.TrainConfig)(stage2=mode, seed=args.seed)
    if args.stage1_steps is not None:
        tcfg = replace(tcfg, stage1_steps=args.stage1_steps, itc_steps=args.stage1_steps)
    if args.stage2_steps is not None:
        tcfg = replace(tcfg, stage2_steps=args.stage2_steps)
    if args.n_eval is not None:
        tcfg = replace(tcfg, n_eval=args.n_eval)
    out = Path(args.out)
    t0 = time.time()
    metrics, _ = vt.train_vlm(vcfg, tcfg, out / f"{connector}-{mode}", torch.device(args.device), cache=out / "cache",
                              progress=False, evaluate_stage1=False, stage1_dir=out / connector / "stage1")
    after = metrics["after stage 2"]
    return {"connector": connector, "mode": mode, "test": after["test"]["all"]["exact"],
            "heldout": after["heldout"]["all"]["exact"], "rougeL": after["test"]["all"]["rougeL"],
            "trainable": metrics["trainable parameters"], "stage2 s": metrics["seconds"]["stage 2"],
            "total s": time.time() - t0, "peak MiB": (lora.peak_rss_bytes() - start_rss) / 2**20,
            "stage1_steps": tcfg.stage1_steps, "stage2_steps": tcfg.stage2_steps, "n_eval": tcfg.n_eval}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, default="runs/bench_vlm_train")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--connectors", type=str, default=",".join(vt.CONNECTORS))
    parser.add_argument("--modes", type=str, default=",".join(vt.STAGE2_MODES))
    parser.add_argument("--stage1-steps", type=int, default=150)
    parser.add_argument("--stage2-steps", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=str, default="cpu")
    args = parser.parse_args(argv)
    if args.tiny:
        args.stage1_steps, args.stage2_steps, args.n_eval = None, None, None
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["vlm_train"])
    rows = []
    for connector in args.connectors.split(","):
        for mode in args.modes.split(","):
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(one_run, (connector, mode, args)))
            r = rows[-1]
            print(f"{connector:9s} {mode:5s} test {r['test']:5.1f}%  held-out {r['heldout']:5.1f}%  "
                  f"{r['total s']:.0f} s", file=sys.stderr, flush=True)
    r0 = rows[0]
    print(f"\nshapes VQA, {r0['stage1_steps']} stage-1 and {r0['stage2_steps']} stage-2 steps (--train uses "
          f"{vt.TrainConfig().stage1_steps} and {vt.TrainConfig().stage2_steps}), exact match of greedy answers "
          f"on {r0['n_eval']} unseen scenes (one question each) and on {r0['n_eval']} scenes with held-out "
          f"colour-shape pairs; {args.threads} threads, {args.device}\n")
    print("| connector | stage 2 | exact match | held-out pairs | ROUGE-L | trainable params | stage-2 time s "
          "| run time s | peak RSS above start MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['connector']} | {r['mode']} | {r['test']:.1f}% | {r['heldout']:.1f}% | {r['rougeL']:.1f} | "
              f"{r['trainable']:,} | {r['stage2 s']:.0f} | {r['total s']:.0f} | {r['peak MiB']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
