"""Experiment configs: composition order, checked keys, errors that name the key and the file."""

import pytest

from tasks.config import ConfigError, load_config


def test_composition_and_overrides():
    cfg = load_config("smoke", ["model.width=96", "precompute.workers=2"])
    assert cfg.name == "smoke" and cfg.data.name == "digits" and cfg.tokenizer.name == "pixel"
    assert cfg.precompute.rows_per_shard == 512 and cfg.precompute.workers == 2  # experiment, CLI
    model = cfg.model_config()
    assert model.width == 96 and model.depth == 4 and model.num_classes == 10  # tiny + override


def test_data_file_is_picked_by_defaults():
    cfg = load_config("smoke", ["defaults.data=imagenet256"])
    assert cfg.data.name == "imagefolder" and cfg.data.flips and cfg.tokenizer.name == "sd_vae"
    assert cfg.model_config().width == 768  # imagenet256 picks imf_b2


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("precompute.rows_per_shar=3", "rows_per_shar"),
        ("model.widht=3", "widht"),
        ("model.width=abc", "model.width"),
    ],
)
def test_bad_keys_are_named_with_their_source(override, named):
    with pytest.raises(ConfigError, match=named) as err:
        load_config("smoke", [override])
    assert "command-line" in str(err.value)


def test_bad_values_and_missing_files():
    with pytest.raises(ConfigError, match="data.name"):
        load_config("smoke", ["data.name=cifar"])
    with pytest.raises(ConfigError, match="known: .*smoke"):
        load_config("no_such_experiment")


def test_malformed_yaml_is_one_line_naming_the_file(tmp_path):
    import shutil

    from tasks.config import CONFIG_DIR

    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    (tmp_path / "configs" / "experiment" / "broken.yaml").write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(
        ConfigError, match=r"broken.yaml is not valid YAML \(line \d+, column \d+\)"
    ) as err:
        load_config("broken", config_dir=tmp_path / "configs")
    assert "\n" not in str(err.value)


def test_compile_modes_and_the_old_name_of_the_jvp_one():
    assert load_config("smoke", ["train.compile=auto"]).train.compile == "auto"
    assert load_config("demo").train.compile == "jvp"
    old = load_config("smoke", ["train.compile=auto", "train.compile_jvp=true"]).train
    assert old.compile == "jvp" and not old.compile_jvp  # configs written before train.compile
    with pytest.raises(ConfigError, match="contradicts train.compile=step"):
        load_config("smoke", ["train.compile=step", "train.compile_jvp=true"])
    with pytest.raises(ConfigError, match="train.compile must be one of"):
        load_config("smoke", ["train.compile=full"])


def test_kernel_choices_stay_out_of_the_training_key():
    from tasks.train import train_key_of

    keys = {
        train_key_of(load_config("smoke", overrides), "pre")
        for overrides in (
            [],
            ["model.jvp_attention=math"],
            ["train.compile=step"],
            ["train.sdpa_backend=cudnn"],
            ["precompute.gpus_per_worker=1"],
        )
    }
    assert len(keys) == 1  # the same numbers, so the same training (reused)
