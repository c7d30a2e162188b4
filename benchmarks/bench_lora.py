"""LoRA / QLoRA forward + backward: lora.py vs peft on the same model, then the memory table.

Speed: one Llama-style model, adapters on every linear layer but lm_head, the very same adapter
weights in both (peft loads ours from disk), one training forward + backward per call; warm-up,
then the median of interleaved repeats (wall and CPU time). QLoRA compares our NF4 base with
peft on transformers' bitsandbytes 4-bit model; ours loads that model's 4-bit checkpoint, so both
hold the same 4-bit weights.

Memory: full fine-tuning vs LoRA vs QLoRA, one training step each in its own process, from
lora.memory_table (the same code as `python lora.py --memory`).

    python benchmarks/bench_lora.py                  # speed, then the 134M memory table
    python benchmarks/bench_lora.py --skip-memory
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--skip-memory", action="store_true", help="only the speed table")
    parser.add_argument("--skip-speed", action="store_true", help="only the memory table")
    args = parser.parse_args(argv)
    bnb_generic_cpu.use_generic_cpu_path()      # bitsandbytes' generic CPU path on every CPU, as in the tests
    results = {}
    if not args.skip_speed:
        results["speed"] = speed_table(args.repeats, args.batch, args.seq_len, args.r)
    if not args.skip_memory:
        print()
        results["memory"] = lora.memory_table(lora.MEMORY_MODEL, "cpu", 256, args.r)
    return results


if __name__ == "__main__":
    main()
