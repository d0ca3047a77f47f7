"""Recipe schema validation: every bad key, type or value is a ConfigError that names the fix."""
import pytest

from ccl_repr.config import Config, config_from_dict, list_recipes, make_config, set_dotted
from ccl_repr.errors import ConfigError

BAD_SETS = [
    # (--set assignment, text the one-line message must contain)
    ("optim.forward.lrr=0.1", "did you mean optim.forward.lr?"),
    ("trian.epochs=3", "valid keys under the top level: method, seed"),
    ("optim.forward.lr=-0.5", "it must be >= 0.0"),
    ("train.epochs=0", "it must be >= 1"),
    ("train.batch_size=abc", "expected an integer, got 'abc'; write e.g. train.batch_size=256"),
    ("train.batch_size=1.5", "expected an integer"),
    ("optim.feedback.lr=fast", "expected a number, got 'fast'; write e.g. optim.feedback.lr=1.0"),
    ("optim.forward.lr=.nan", "expected a finite number"),
    ("optim.forward.lr=.inf", "expected a finite number"),
    ("data.val_fraction=0.95", "it must be <= 0.9"),
    ("data.normalize=maybe", "expected true or false"),
    ("model.act_forward=sigmoid", "choose one of them"),
    ("model.widths=[128,0]", "model.widths[1]: 0 is out of range; it must be >= 1"),
    ("model.widths=[128", "not valid YAML"),
    ("seed=4294967296", "it must be <= 4294967294"),
    ("optim.forward=3", "optim.forward: expected a mapping"),
    ("method=sgd", "is not one of bp, ccl, dfa, drtp, fa, fwdtp; see ccl-repr rules"),
    ("optim.forward.lr", "expected KEY=VALUE"),
    ("optim..lr=1", "empty key part"),
]


@pytest.mark.parametrize("assignment,expected", BAD_SETS, ids=[a for a, _ in BAD_SETS])
def test_bad_override_is_one_line_config_error(assignment, expected):
    with pytest.raises(ConfigError) as e:
        make_config("mlp_digits", sets=[assignment])
    msg = str(e.value)
    assert expected in msg and "\n" not in msg


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid keys under optim.forward: lr, momentum, weight_decay, clip"):
        make_config("mlp_digits", sets=["optim.forward.lrr=0.1"])


def test_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="mlp_digits"):  # lists the recipes that exist
        make_config("no_such_recipe")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        make_config(str(bad_yaml))
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        make_config(str(listed))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train: {epochs: 2, learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="unknown config key train.learning_rate"):
        make_config(str(unknown))


def test_valid_values_pass_and_round_trip():
    cfg = make_config("mlp_digits", method="bp", overrides={"train": {"epochs": 3}},
                      sets=["optim.forward.lr=0", "model.widths=64,32", "data.normalize=off", "seed=4294967294"])
    assert (cfg.method, cfg.train.epochs, cfg.optim.forward.lr, cfg.model.widths) == ("bp", 3, 0.0, [64, 32])
    assert cfg.data.normalize is False
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_bundled_recipe_validates(recipe):
    assert isinstance(make_config(recipe), Config)


def test_set_dotted_refuses_descending_into_a_value():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        set_dotted({"train": 3}, "train.epochs=2")
