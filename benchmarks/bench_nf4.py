"""NF4 quantize + dequantize with double quantization: nf4.py vs bitsandbytes on CPU, one process.

bitsandbytes runs its generic CPU path (tests/bnb_generic_cpu.py says why), as in the tests.

Times both on the same (4096, 4096) fp32 matrix of N(0, 0.02^2) weights (warm-up, then the median
of interleaved repeats, wall and CPU time), then measures how close each one's double-quantized
absmax constants are to the true ones and how well each reconstructs the weights.

    python benchmarks/bench_nf4.py            # (4096, 4096), 9 repeats
    python benchmarks/bench_nf4.py --size 1024 --repeats 3
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import nf4  # noqa: E402
import bnb_generic_cpu  # noqa: E402  (bitsandbytes' generic CPU path on every CPU, as the tests use)


def race(candidates: dict, repeats: int) -> dict:
    """Median wall and CPU seconds per candidate, calls interleaved so that load hits all alike."""
    for fn in candidates.values():
        fn()                                                         # warm-up
    wall = {k: [] for k in candidates}
    cpu = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in candidates}


def timing_table(w: torch.Tensor, repeats: int) -> dict:
    import bitsandbytes.functional as bnb

    packed, state = nf4.quantize_nf4(w)
    packed_b, state_b = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    steps = {
        "quantize": {"nf4.py": lambda: nf4.quantize_nf4(w),
                     "bitsandbytes": lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)},
        "dequantize": {"nf4.py": lambda: nf4.dequantize_nf4(packed, state),
                       "bitsandbytes": lambda: bnb.dequantize_4bit(packed_b, state_b, quant_type="nf4")},
        "quantize + dequantize": {"nf4.py": lambda: nf4.dequantize_nf4(*nf4.quantize_nf4(w)),
                                  "bitsandbytes": lambda: bnb.dequantize_4bit(*bnb.quantize_4bit(
                                      w, blocksize=64, quant_type="nf4", compress_statistics=True), quant_type="nf4")},
    }
    print(f"| ({w.shape[0]}, {w.shape[1]}) fp32, blocksize 64, double quant, CPU, {torch.get_num_threads()} threads "
          "| nf4.py ms (wall / CPU) | bitsandbytes ms (wall / CPU) | ratio wall | ratio CPU |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    for step, candidates in steps.items():
        t = race(candidates, repeats)
        (ow, oc), (bw, bc) = t["nf4.py"], t["bitsandbytes"]
        results[step] = (ow / bw, oc / bc)
        print(f"| {step} | {1e3 * ow:.0f} / {1e3 * oc:.0f} | {1e3 * bw:.0f} / {1e3 * bc:.0f} | {ow / bw:.2f} | {oc / bc:.2f} |")
    return results


def closeness_table(w: torch.Tensor) -> dict:
    """Double quantization: our nearest rounding vs bitsandbytes' kernel, against the true absmax."""
    import bitsandbytes.functional as bnb

    packed, state = nf4.quantize_nf4(w)
    packed_b, state_b = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    true = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")[1].absmax      # single-quantized constants
    theirs_state = nf4.NF4State(state_b.absmax, state_b.shape, state_b.dtype, 64, state_b.code, state_b.offset,
                                state_b.state2.absmax, state_b.state2.code)
    ours_err = (state.absmax_fp32() - true).abs()
    theirs_err = (theirs_state.absmax_fp32() - true).abs()
    w_err = (nf4.dequantize_nf4(packed, state) - w).abs().mean().item()
    w_err_b = (bnb.dequantize_4bit(packed_b, state_b, quant_type="nf4") - w).abs().mean().item()
    r = {
        "offset equal": torch.equal(state.offset, state_b.offset),
        "256-block scales equal": torch.equal(state.nested_absmax, state_b.state2.absmax),
        "8-bit codes that differ": (state.absmax != state_b.absmax).float().mean().item(),
        "constants further from the true value than bitsandbytes'": (ours_err > theirs_err).sum().item(),
        "mean constant error, nf4.py / bitsandbytes": ours_err.mean().item() / theirs_err.mean().item(),
        "max constant error, nf4.py / bitsandbytes": ours_err.max().item() / theirs_err.max().item(),
        "mean weight error nf4.py": w_err,
        "mean weight error bitsandbytes": w_err_b,
        "weight error difference": w_err / w_err_b - 1,
    }
    print("\n| double quantization of the absmax constants | value |\n|---|---:|")
    for key, value in r.items():
        text = f"{value:.3e}" if "weight error" in key and "difference" not in key else (
            f"{value:+.4%}" if "difference" in key else f"{value:.2%}" if "differ" in key else
            f"{value:.5f}" if isinstance(value, float) else str(value))
        print(f"| {key} | {text} |")
    return r


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the weight matrix is size x size")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # bitsandbytes' C dequantization kernel is wrong on some shapes on AVX-512-BF16 CPUs: compare with
    # (and time) its generic path everywhere, so that the figures mean the same on every machine
    bnb_generic_cpu.use_generic_cpu_path()
    torch.manual_seed(args.seed)
    w = torch.randn(args.size, args.size) * 0.02
    return timing_table(w, args.repeats), closeness_table(w)


if __name__ == "__main__":
    main()
