"""Patch a transformers model with a fapm delta, in memory.

Makes a tiny Llama from a config (no downloads), saves it as the base, perturbs it into a
"fine-tune", prunes that into a delta with fapm, then:

1. loads the base with transformers and patches it in place (`fapm.patch_`), and checks that it
   now equals, bit for bit, the model `fapm apply` writes, loaded the usual way;
2. serves the fine-tune and the base from one loaded model (`fapm.patched`);
3. streams the patches as (indices, values), as an engine taking sparse updates would.

    python python/examples/transformers_patch.py [WORKDIR]
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fapm


def main(work: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(work / "base")
    # A stand-in for fine-tuning: small changes to most weights, larger ones to a few.
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.002 * p.abs().mean())
            p.view(-1)[:: 97].add_(0.05)
    base.save_pretrained(work / "finetuned")

    summary = fapm.prune(work / "base", work / "finetuned", work / "ft.fapm", sparsity=0.9, overwrite=True)
    print(f"delta: {summary['delta_bytes']} bytes, {summary['kept_fraction']:.1%} of the weights kept")

    # 1. Patch a loaded base in place: three lines.
    model = LlamaForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
    t = time.perf_counter()
    fapm.patch_(model, work / "ft.fapm")
    print(f"patch_ took {time.perf_counter() - t:.3f} s")

    fapm.apply(work / "base", work / "ft.fapm", work / "applied", overwrite=True)
    applied = LlamaForCausalLM.from_pretrained(work / "applied", dtype=torch.bfloat16)
    got, want = model.state_dict(), applied.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k].view(torch.int16), want[k].view(torch.int16)) for k in want)
    print("patched model == the model fapm apply wrote, bit for bit")

    # The same from the delta and the base files, without loading a model first.
    tensors = fapm.load_file(work / "ft.fapm", work / "base", framework="pt")
    assert all(torch.equal(tensors[k].view(torch.int16), want[k].view(torch.int16)) for k in tensors)

    # 2. One loaded base, the fine-tune for the length of a block.
    base_model = LlamaForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
    prompt = torch.tensor([[1, 17, 42, 99]])
    with torch.no_grad():
        before = base_model(prompt).logits
        with fapm.patched(base_model, work / "ft.fapm"):
            tuned = base_model(prompt).logits
        after = base_model(prompt).logits
    assert torch.equal(before, after) and torch.equal(tuned, applied(prompt).logits.detach())
    print("patched(): fine-tuned logits inside the block, base logits again after it")

    # 3. Sparse updates for an engine: the base is needed, as the delta stores differences.
    n = 0
    for name, indices, values in fapm.iter_patches(work / "ft.fapm", base_model.state_dict()):
        if indices is not None:
            n += len(indices)
    print(f"iter_patches: {n} (index, value) pairs")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
