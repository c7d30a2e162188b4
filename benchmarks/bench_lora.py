"""LoRA / QLoRA forward + backward: lora.py vs peft on the same model, then the memory table.

Speed: one Llama-style model, adapters on every linear layer but lm_head, the very same adapter
weights in both (peft loads ours from disk), one training forward + backward per call; warm-up,
then the median of interleaved repeats (wall and CPU time). QLoRA compares our NF4 base with
peft on transformers' bitsandbytes 4-bit model; ours loads that model's 4-bit checkpoint, so both
hold the same 4-bit weights.

Memory: full fine-tuning vs LoRA vs QLoRA, one training step each in its own process: weights,
gradients and AdamW state counted tensor by tensor (lora.training_state_bytes), and the process's
peak RSS (or peak CUDA memory) measured.

    python benchmarks/bench_lora.py                  # speed, then the 134M memory table
    python benchmarks/bench_lora.py --skip-memory
    python benchmarks/bench_lora.py --skip-speed     # the memory table alone
    python benchmarks/bench_lora.py --skip-speed --tiny   # a 2-layer model, seconds (the tests run it)
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora  # noqa: E402
import nf4  # noqa: E402
from bench_nf4 import race  # noqa: E402  (interleaved medians, shared by both benchmarks)
import bnb_generic_cpu  # noqa: E402  (tests/, put on the path by bench_nf4)

SPEED_MODEL = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8, num_kv_heads=8)


def step(model, tokens):
    """One training forward + backward (no optimizer step: both would run the same torch AdamW)."""
    def run():
        model.zero_grad(set_to_none=True)
        lora.lm_loss(model, tokens).backward()
    return run


def build_pairs(tmp: str, r: int):
    """(ours, peft) for LoRA and for QLoRA, each pair with identical base and adapter weights."""
    import peft
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(lora.llama_config(**SPEED_MODEL))
    base.save_pretrained(os.path.join(tmp, "fp32"))
    ours = lora.apply_lora(LlamaForCausalLM.from_pretrained(os.path.join(tmp, "fp32")), "all-linear", r, 2 * r)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)                                    # a trained-looking adapter
    lora.save_adapter(ours, os.path.join(tmp, "adapter"))
    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(os.path.join(tmp, "fp32")),
                                            os.path.join(tmp, "adapter"), is_trainable=True)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    hf4 = LlamaForCausalLM.from_pretrained(os.path.join(tmp, "fp32"), quantization_config=bnb_config, device_map="cpu")
    hf4.save_pretrained(os.path.join(tmp, "hf4"))
    theirs_q = peft.PeftModel.from_pretrained(hf4, os.path.join(tmp, "adapter"), is_trainable=True)
    # our NF4 base reads transformers' 4-bit checkpoint, so both hold the very same 4-bit weights
    ours_q = nf4.quantize_model(LlamaForCausalLM.from_pretrained(os.path.join(tmp, "fp32")))
    ours_q.load_state_dict(load_file(os.path.join(tmp, "hf4", "model.safetensors")))
    lora.load_adapter(ours_q, os.path.join(tmp, "adapter"))
    return {"LoRA": (ours.train(), theirs.train()), "QLoRA": (ours_q.train(), theirs_q.train())}


def speed_table(repeats: int, batch: int, seq_len: int, r: int) -> dict:
    tokens = torch.randint(0, SPEED_MODEL["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        pairs = build_pairs(tmp, r)
    n_params = sum(p.numel() for p in pairs["LoRA"][0].parameters())
    print(f"| forward + backward, {n_params / 1e6:.0f}M-param Llama, r={r} on all linear layers, batch ({batch}, {seq_len}), "
          f"CPU {torch.get_num_threads()} threads | lora.py ms (wall / CPU) | peft ms (wall / CPU) | ratio wall | ratio CPU |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    for method, (ours, theirs) in pairs.items():
        with torch.no_grad():
            same = torch.equal(ours.eval()(input_ids=tokens).logits, theirs.eval()(input_ids=tokens).logits)
        ours.train(), theirs.train()
        t = race({"ours": step(ours, tokens), "peft": step(theirs, tokens)}, repeats)
        (ow, oc), (pw, pc) = t["ours"], t["peft"]
        results[method] = (ow / pw, oc / pc)
        label = method + (" (peft on bitsandbytes Linear4bit)" if method == "QLoRA" else "")
        print(f"| {label}, logits identical: {same} | {1e3 * ow:.0f} / {1e3 * oc:.0f} | {1e3 * pw:.0f} / {1e3 * pc:.0f} | "
              f"{ow / pw:.2f} | {oc / pc:.2f} |")
    return results


# ----------------------------------------------------------------------------------------------
# Memory: one training step of full fine-tuning vs LoRA vs QLoRA, each in a fresh child process
# ----------------------------------------------------------------------------------------------

# A Llama-style model of GPT-2-small width: 12 layers x 768, 32k vocabulary, 134M parameters.
MEMORY_MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                    num_heads=12, num_kv_heads=12)
MEMORY_MODEL_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2)
MEMORY_METHODS = ("full", "lora", "qlora")


def memory_child(method: str, model_kwargs: dict, checkpoint: str, device: str, seq_len: int, r: int) -> dict:
    """One training step of `method` in this (fresh) process; returns its byte counts and peak."""
    from transformers import LlamaForCausalLM

    lora.return_freed_memory_to_the_os()
    device = torch.device(device)
    baseline = lora.peak_rss_bytes()                                      # python + torch + transformers
    with nf4.init_empty_weights():                                   # parameters on 'meta': no memory
        model = LlamaForCausalLM(lora.llama_config(**model_kwargs))
    weights = nf4.SafetensorsWeights(checkpoint)
    if method == "qlora":
        nf4.quantize_model(model, weights=weights)                   # each layer read, then quantized
    else:
        nf4.load_weights(model, weights)
    model.to(device)
    if method == "full":
        model.requires_grad_(True)
    else:
        lora.apply_lora(model, "all-linear", r, 2 * r)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, model_kwargs["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lora.lm_loss(model, tokens.to(device)).backward()
    opt.step()
    out = lora.training_state_bytes(model, opt)
    out.update(method=method, trainable=lora.count_parameters(model)[0], total=lora.count_parameters(model)[1],
               peak=lora.peak_rss_bytes(), baseline=baseline)
    if device.type == "cuda":
        out.update(peak=torch.cuda.max_memory_allocated(), baseline=0)
    return out


def make_checkpoint(model_kwargs: dict, path: str, seed: int = 0) -> None:
    """A random fp32 checkpoint of the model (freed again before the children start)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(lora.llama_config(**model_kwargs))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"format": "pt"})


def memory_table(model_kwargs: dict = MEMORY_MODEL, device: str = "cpu", seq_len: int = 256, r: int = 16) -> list[dict]:
    """Measure one training step per method, each in a fresh process, and print the table.

    The processes fork from a server that has imported torch and transformers once (forkserver),
    so each child starts small and fast; its peak RSS minus its RSS at start is what the method
    itself needed.
    """
    import multiprocessing as mp

    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["lora", "bench_lora", "transformers.models.llama.modeling_llama"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "model.safetensors")
        make_checkpoint(model_kwargs, ckpt)
        for name in MEMORY_METHODS:
            with ctx.Pool(1) as pool:                                 # a new process per method
                rows.append(pool.apply(memory_child, (name, model_kwargs, ckpt, device, seq_len, r)))
    print_memory_table(rows, device)
    return rows


def print_memory_table(rows: list[dict], device: str) -> None:
    """Markdown table of the byte counts and peaks, with ratios to full fine-tuning."""
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    state = {row["method"]: row["weights"] + row["grads"] + row["optimizer"] for row in rows}
    above = {row["method"]: row["peak"] - row["baseline"] for row in rows}
    peak = "peak CUDA allocated" if device.startswith("cuda") else "peak RSS"
    print(f"| method | trainable / all params | weights MiB | grads MiB | AdamW state MiB | training state MiB | "
          f"vs full | {peak} MiB | peak - start MiB | vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        m = row["method"]
        print(f"| {m} | {row['trainable']:,} / {row['total']:,} | {mib(row['weights'])} | {mib(row['grads'])} | "
              f"{mib(row['optimizer'])} | {mib(state[m])} | {state[m] / state['full']:.3f} | {mib(row['peak'])} | "
              f"{mib(above[m])} | {above[m] / above['full']:.3f} |")
    other = ", ".join(f"{m} {mib(above[m] - state[m])}" for m in state)
    print(f"\nstart: the child's {peak} after importing torch and transformers ({mib(rows[0]['baseline'])} MiB). "
          f"peak - start - training state = activations and temporaries (MiB): {other}.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--skip-memory", action="store_true", help="only the speed table")
    parser.add_argument("--skip-speed", action="store_true", help="only the memory table")
    parser.add_argument("--tiny", action="store_true", help="memory of a 2-layer model (seconds), as the tests run it")
    parser.add_argument("--device", type=str, default="cpu", help="memory table on cpu or cuda")
    args = parser.parse_args(argv)
    bnb_generic_cpu.use_generic_cpu_path()      # bitsandbytes' generic CPU path on every CPU, as in the tests
    results = {}
    if not args.skip_speed:
        results["speed"] = speed_table(args.repeats, args.batch, args.seq_len, args.r)
    if not args.skip_memory:
        print()
        model = MEMORY_MODEL_TINY if args.tiny else MEMORY_MODEL
        results["memory"] = memory_table(model, args.device, 16 if args.tiny else 256, args.r)
    return results


if __name__ == "__main__":
    main()
