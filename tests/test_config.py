import pytest

from recalign import config as cfg
from recalign.errors import InputError

DEFAULTS = cfg.merge_defaults(cfg.BASE_DEFAULTS, {"train": {"epochs": 3, "lr": 0.001, "fast": False},
                                                   "eval": {"ks": [10, 20]}, "model": {"name": None}})


def test_precedence_defaults_file_sets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 5\n  lr: 0.01\nseed: 3\n")
    out = cfg.resolve(DEFAULTS, path, ["train.epochs=7", "eval.ks=[5, 10]", "model.name=tiny"])
    assert out["train"] == {"epochs": 7, "lr": 0.01, "fast": False}
    assert out["seed"] == 3 and out["eval"]["ks"] == [5, 10] and out["model"]["name"] == "tiny"
    assert DEFAULTS["train"]["epochs"] == 3  # defaults untouched


def test_int_accepted_for_float_and_dumped_round_trip(tmp_path):
    out = cfg.resolve(DEFAULTS, None, ["train.lr=1"])
    assert out["train"]["lr"] == 1.0 and isinstance(out["train"]["lr"], float)
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.dump(out))
    assert cfg.resolve(DEFAULTS, path) == out


@pytest.mark.parametrize("item, message", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("train.epochs=three", "expects an integer"),
    ("train.epochs=2.5", "expects an integer"),
    ("train.fast=1", "expects true/false"),
    ("eval.ks=10", "expects a list"),
    ("noequals", "expected key=value"),
])
def test_bad_sets(item, message):
    with pytest.raises(InputError, match=message):
        cfg.resolve(DEFAULTS, None, [item])


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 1\n")
    with pytest.raises(InputError) as err:
        cfg.resolve(DEFAULTS, path)
    assert str(path) in str(err.value) and "train.epochs" in str(err.value)


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 1\n  lr: [1, 2\n")
    with pytest.raises(InputError, match=r"c\.yaml:\d+: invalid YAML"):
        cfg.resolve(DEFAULTS, path)


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(InputError, match="must be a mapping"):
        cfg.resolve(DEFAULTS, path)
