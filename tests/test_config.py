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


def test_exponent_floats_without_a_dot_are_numbers_on_the_command_line_and_in_files(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; learning rates are written that way, so recalign reads it as
    YAML 1.2 does."""
    out = cfg.resolve(DEFAULTS, None, ["train.lr=1e-4"])
    assert out["train"]["lr"] == pytest.approx(1e-4)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5E-3\n")
    assert cfg.resolve(DEFAULTS, path)["train"]["lr"] == pytest.approx(5e-3)
    assert cfg.parse_set("model.name=1e")[1] == "1e"  # not a number: stays text
    with pytest.raises(InputError, match="expects an integer"):
        cfg.resolve(DEFAULTS, None, ["train.epochs=1e3"])  # a float is still not an integer


def test_only_true_and_false_are_booleans_as_in_yaml_1_2(tmp_path):
    """YAML 1.1 reads Yes/No/on/off as booleans: the Yes/No answer texts (`prompt.yes: Yes`) and the key
    `yes:` itself were refused ("expects a string, got True", "unknown config key 'prompt.True'")."""
    from recalign.methods import get_method

    defaults = get_method("tallrec").defaults
    assert cfg.resolve(defaults, None, ["prompt.yes=Yes", "prompt.no=No"])["prompt"]["yes"] == "Yes"
    path = tmp_path / "c.yaml"
    path.write_text("prompt:\n  yes: Sure\n  no: Nope\n")
    resolved = cfg.resolve(defaults, path)
    assert (resolved["prompt"]["yes"], resolved["prompt"]["no"]) == ("Sure", "Nope")
    assert cfg.parse_set("train.answer_only=false")[1] is False and cfg.parse_set("x=True")[1] is True
    assert cfg.parse_set("x=on")[1] == "on"


@pytest.mark.parametrize("item, message", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("train.epochs=three", "expects an integer"),
    ("train.epochs=2.5", "expects an integer"),
    ("train.fast=1", "expects true/false"),
    ("eval.ks=10", "expects a list"),
    ("noequals", "expected key=value"),
    ("train.epochs=null", "key 'train.epochs' cannot be null; it expects an integer"),
    ("eval.ks=~", "cannot be null; it expects a list"),
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


def test_a_section_of_the_wrong_shape_says_so(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: [1, 2]\n")
    with pytest.raises(InputError, match="'train' is a section and expects a mapping"):
        cfg.resolve(DEFAULTS, path)
    with pytest.raises(InputError, match="'eval' is a section"):
        cfg.resolve(DEFAULTS, None, ["eval=10"])
    out = cfg.resolve(DEFAULTS, None, ["train={epochs: 9}"])  # a mapping on --set is read key by key
    assert out["train"]["epochs"] == 9 and out["train"]["lr"] == 0.001


def test_a_key_given_twice_in_a_config_file_is_an_error_with_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 5\n  epochs: 6\n")
    with pytest.raises(InputError, match=r"c.yaml:3: invalid YAML \(duplicate key 'epochs' \(first on line 2\)\)"):
        cfg.resolve(DEFAULTS, path)


def test_a_mapping_valued_setting_is_not_split_into_unknown_keys(tmp_path):
    defaults = cfg.merge_defaults(cfg.BASE_DEFAULTS, {"cf": {"params": {}, "model": "mf"}})
    path = tmp_path / "c.yaml"
    path.write_text("cf:\n  params:\n    embedding_size: 32\n")
    assert cfg.resolve(defaults, path)["cf"]["params"] == {"embedding_size": 32}
    assert cfg.resolve(defaults, None, ["cf.params={embedding_size: 16}"])["cf"]["params"] == {"embedding_size": 16}


def test_a_directory_as_config_file_says_so(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        cfg.resolve(DEFAULTS, tmp_path)


def test_a_config_file_that_exists_but_is_not_a_regular_file_says_so(tmp_path):
    with pytest.raises(InputError, match=r"^/dev/zero: not a regular file$"):  # never read: it has no end
        cfg.resolve(DEFAULTS, "/dev/zero")
    with pytest.raises(InputError, match="config file not found"):
        cfg.resolve(DEFAULTS, tmp_path / "missing.yaml")


def test_null_is_kept_for_keys_whose_default_is_null_or_declared_nullable():
    out = cfg.resolve(DEFAULTS, None, ["model.name=null", "data.like_threshold=null"])
    assert out["model"]["name"] is None and out["data"]["like_threshold"] is None
    out = cfg.resolve(DEFAULTS, None, ["train.lr=null"], nullable={"train.lr": 0.1})
    assert out["train"]["lr"] is None
