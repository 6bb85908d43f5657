"""The renaming between a delta's names and a model's, found by matching (fapm._names)."""

from fapm._names import prefix_map

DELTA = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
         "encoder.layer.0.output.dense.bias", "pooler.dense.weight", "embeddings.position_ids"]


def test_a_module_prefix_to_add():
    for prefix in ("0.auto_model.", "0.model.", "body.0.auto_model."):
        keys = [prefix + n for n in DELTA] + ["2.linear.weight"]
        assert prefix_map(DELTA, keys) == ("", prefix)


def test_a_prefix_to_strip_and_one_to_add():
    delta = ["bert." + n for n in DELTA] + ["classifier.weight"]
    assert prefix_map(delta, DELTA) == ("bert.", "")
    assert prefix_map(delta, ["0.model." + n for n in DELTA]) == ("bert.", "0.model.")


def test_names_that_match_already_need_no_renaming():
    assert prefix_map(DELTA, DELTA) is None
    assert prefix_map(DELTA, ["something.else.entirely"]) is None


def test_the_renaming_most_names_agree_on_wins():
    keys = ["a." + n for n in DELTA] + ["b.pooler.dense.weight.x"]
    # "pooler.dense.weight" is only in a.; a tail that ends several model names is no evidence.
    keys += ["b.pooler.dense.weight"]
    assert prefix_map(DELTA, keys) == ("", "a.")


def test_a_bare_last_component_is_no_evidence():
    assert prefix_map(["x.weight", "y.weight"], ["m.weight"]) is None
