"""Range checks of CF settings: a value the model or optimiser cannot take is one InputError naming the key,
for the CF baselines and for CoLLM's CF step alike (found by the config property tests and an edge-value sweep)."""

import pytest

from recalign.errors import InputError
from recalign.runner import resolve_config


@pytest.mark.parametrize("method, item, message", [
    ("mf", "eval.batch_size=0", "eval.batch_size: must be >= 1, got 0"),
    ("mf", "train.eval_every=0", "train.eval_every: must be >= 1"),
    ("mf", "train.lr=.nan", "train.lr: must be a finite number > 0, got nan"),
    ("mf", "train.weight_decay=-1", "train.weight_decay: must be a finite number >= 0"),
    ("mf", "train.max_minutes=.inf", "train.max_minutes: must be a finite number"),
    ("mf", "model.embedding_size=-1", "model.embedding_size: must be >= 1, got -1"),
    ("itemcf", "model.k=0", "model.k: must be >= 1"),
    ("sasrec", "model.dropout=1.0", "model.dropout: must be in [0, 1), got 1.0"),
    ("dros", "model.sasrec.max_len=0", "model.sasrec.max_len: must be >= 1"),
    ("collm", "cf.train.lr=.nan", "cf.train.lr: must be a finite number > 0"),
    ("collm", "cf.params={embedding_size: 0}", "cf.params.embedding_size: must be >= 1"),
    ("recinterpreter", "encoder.params={dropout: 1.5}", "encoder.params.dropout: must be in [0, 1)"),
    ("recinterpreter", "encoder.train.max_minutes=.inf", "encoder.train.max_minutes: expected a finite number"),
])
def test_out_of_range_cf_settings_are_one_line_errors(method, item, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        resolve_config(method, None, [item])


@pytest.mark.parametrize("method, item", [
    ("mf", "train.patience=0"), ("mf", "train.max_minutes=0"), ("dreamrec", "model.sample_seed=0"),
    ("mf", "train.bce_negatives=0"), ("sasrec", "model.dropout=0.0"),
])
def test_documented_zero_settings_stay_valid(method, item):
    resolve_config(method, None, [item])


def test_a_size_too_large_for_memory_is_one_line_exit_2_and_leaves_no_run(monkeypatch, capsys, tmp_path):
    from cli_helpers import invoke

    out = tmp_path / "run"
    fixture = str(__import__("pathlib").Path(__file__).parent / "fixtures" / "recbole" / "tiny.inter")
    code, _, err = invoke(monkeypatch, capsys, "run", "mf", "--dataset", fixture, "--out", str(out),
                          "--set", "model.embedding_size=1000000000000", "--set", "train.epochs=1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "out of memory" in err, err
    assert not out.exists()


def test_attention_heads_must_divide_the_embedding_size():
    from recalign.cf import create_model
    from recalign.cf.checks import check_model_settings

    with pytest.raises(InputError, match=r"^model.sasrec.n_heads: must divide model.sasrec.embedding_size \(64\), got 5$"):
        check_model_settings({"sasrec": {"embedding_size": 64, "n_heads": 5}})
    check_model_settings({"embedding_size": 64, "n_heads": 4})
    with pytest.raises(InputError, match="n_heads must divide embedding_size"):  # not an AssertionError
        create_model("sasrec", 5, 20, n_heads=3)
