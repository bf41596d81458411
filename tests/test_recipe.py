import pytest

from detq_hooks.recipe import PRESETS, Recipe, RecipeError, load_recipe


def test_presets_and_bits():
    assert {"w8a8", "w4a8", "w4a4"} <= set(PRESETS)
    r = load_recipe("w4a4")
    assert (r.quantization.weight.bits, r.quantization.activation.bits) == (4, 4)
    assert r.quantization.weight.symmetric and r.quantization.weight.per_channel
    assert not r.quantization.activation.symmetric and not r.quantization.activation.per_channel
    assert r.quantization.first_layer_bits == 8 and r.quantization.prediction_layer_bits == 8
    assert load_recipe("w8a8-ptq").mode == "ptq"
    # TASKQ at every width: the 4-bit presets' reconstruction on the 8-bit conversion
    for bits in ("w8a8", "w4a8", "w4a4"):
        taskq, ptq = load_recipe(f"{bits}-taskq"), load_recipe(f"{bits}-ptq")
        assert (taskq.mode, taskq.ptq.method, taskq.calibration.num_batches) == ("ptq", "taskq", 16)
        assert taskq.quantization == ptq.quantization


def test_dict_roundtrip_and_override(tmp_path):
    r = load_recipe({"preset": "w4a8", "quantization": {"activation": {"bits": 6, "kind": "lsq_plus"}},
                     "calibration": {"method": "entropy"}})
    assert r.quantization.activation.bits == 6 and r.quantization.weight.bits == 4
    assert Recipe.from_dict(r.to_dict()) == r
    p = tmp_path / "r.yaml"
    from detq_hooks.recipe import recipe_to_yaml

    p.write_text(recipe_to_yaml(r))
    assert load_recipe(p) == r
    assert load_recipe(str(p)) == r


@pytest.mark.parametrize(
    "bad, match",
    [
        ("w3a3", r"unknown recipe preset 'w3a3'"),
        ({"preset": "nope"}, r"unknown recipe preset 'nope'"),
        ({"quantization": {"weight": {"bits": 9}}}, r"`quantization.weight.bits` = 9 is out of range"),
        ({"quantization": {"activation": {"bits": 1}}}, r"`quantization.activation.bits` = 1 is out of range"),
        ({"quantization": {"wieght": {"bits": 4}}}, r"unknown key\(s\) \['wieght'\] in `quantization`"),
        ({"quantisation": {}}, r"unknown key\(s\) \['quantisation'\]"),
        ({"calibration": {"method": "magic"}}, r"`calibration.method` = 'magic'"),
        ({"calibration": {"num_batches": 0}}, r"`calibration.num_batches` = 0"),
        ({"quantization": {"weight": {"kind": "lsq_plus"}}}, r"needs `symmetric: false`"),
        ({"quantization": {"rules": [{"quantize": False}]}}, r"needs `name` and/or `types`"),
        ({"quantization": {"rules": [{"name": "re:(["}]}}, r"not a valid regular expression"),
        ({"quantization": {"rules": [{"types": ["Conv3d"]}]}}, r"`quantization.rules\[\].types` = 'Conv3d'"),
        ({"mode": "train"}, r"`mode` = 'train'"),
        ({"version": 2}, r"`version` = 2 is not supported"),
        ({"quantization": {"activation": {"per_channel": True}}}, r"per_channel` = True is not supported"),
        ({"distillation": {"teacher_precision": "int8"}}, r"`distillation.teacher_precision` = 'int8' must be one of"),
    ],
)
def test_bad_recipes_name_the_culprit(bad, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(bad)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
