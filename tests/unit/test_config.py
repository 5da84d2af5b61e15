import glob

import pytest

from pipeline.config import PrecomputeConfig, TrainConfig, load_config, load_train_config
from pipeline.errors import DistillError

SHIPPED = sorted(glob.glob("jobs/configs/**/*.yaml", recursive=True))


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_config_validates(path):
    from pipeline.config.sweep import SweepConfig

    cfg = load_config(path)
    assert isinstance(cfg, (PrecomputeConfig, TrainConfig, SweepConfig))


def test_shipped_configs_exist():
    for name in ("digits/precompute.yaml", "digits/train-kd.yaml", "digits/train-hard.yaml"):
        assert f"jobs/configs/{name}" in SHIPPED


def test_script_facing_names_are_stable():
    pre = load_config("jobs/configs/digits/precompute.yaml")
    assert pre.cache_root
    train = load_train_config("jobs/configs/digits/train-kd.yaml")
    assert {"cache", "storage_path", "epochs", "seed"} <= set(TrainConfig.model_fields)
    assert train.epochs > 0 and train.storage_path


def test_set_overrides_nested_fields_with_types():
    cfg = load_train_config("jobs/configs/digits/train-kd.yaml",
                            ["epochs=3", "loss.temperature=2.5", "loss.terms.kd=0", "student.kwargs.hidden=[8, 8]"])
    assert cfg.epochs == 3 and cfg.loss.temperature == 2.5
    assert cfg.loss.terms == {"kd": 0, "ce": 0.3} and cfg.alpha == 0.0
    assert cfg.student.kwargs["hidden"] == [8, 8]
    assert cfg.name == "train-kd-seed0"


def test_default_run_name_follows_seed_override():
    assert load_train_config("jobs/configs/digits/train-kd.yaml", ["seed=2"]).name == "train-kd-seed2"


@pytest.mark.parametrize("override,field", [
    ("loss.temperature=0", "loss.temperature"),
    ("epochs=zero", "epochs"),
    ("loss.terms.bogus=1", "loss.terms"),
    ("student.factory=nocolon", "student.factory"),
    ("typo_field=1", "typo_field"),
    ("optimizer.name=lbfgs", "optimizer.name"),
])
def test_bad_field_is_named(override, field):
    with pytest.raises(DistillError) as e:
        load_train_config("jobs/configs/digits/train-kd.yaml", [override])
    assert f"field `{field}`" in e.value.problem
    assert "--set" in e.value.fix


def test_cache_and_precompute_are_exclusive():
    with pytest.raises(DistillError, match="exactly one of `cache`"):
        load_train_config("jobs/configs/digits/train-kd.yaml", ["cache=runs/cache/x"])


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("source:\n  kind: digits\n teacher: [\n")
    with pytest.raises(DistillError, match=r"invalid YAML in .*bad.yaml at line"):
        load_config(p)


def test_bad_override_syntax():
    with pytest.raises(DistillError, match="bad override"):
        load_train_config("jobs/configs/digits/train-kd.yaml", ["epochs"])


@pytest.mark.parametrize("config,override,field", [
    ("jobs/configs/digits/precompute.yaml", "source.uri=data.parquet", "source.uri"),  # a parquet field on digits
    ("jobs/configs/digits/precompute.yaml", "source.seq_len=64", "source.seq_len"),  # a text field on digits
    ("jobs/configs/digits/precompute.yaml", "outputs.logits.k=8", "outputs.logits.k"),  # a top-k field on full logits
    ("jobs/configs/text/precompute-topk.yaml", "outputs.logits.dtype=float32", "outputs.logits.dtype"),
    ("jobs/configs/text/precompute-topk.yaml", "outputs.logits.k=0", "outputs.logits.k"),
    ("jobs/configs/digits/precompute.yaml", "source.kind=parquet", "source.uri"),  # the kind's required field
    ("jobs/configs/digits/precompute.yaml", "source.kind=csv", "source"),
])
def test_each_kind_and_mode_carries_only_its_own_fields(config, override, field):
    with pytest.raises(DistillError) as e:
        load_config(config, [override])
    assert f"field `{field}`" in e.value.problem
    assert f"--set {field}=" in e.value.fix


def test_source_and_logits_classes_follow_their_tags():
    from pipeline.config import DigitsSource, FullLogits, TextSource, TopkLogits

    digits, text = load_config("jobs/configs/digits/precompute.yaml"), load_config("jobs/configs/text/precompute-topk.yaml")
    assert isinstance(digits.source, DigitsSource) and isinstance(digits.outputs.logits, FullLogits)
    assert isinstance(text.source, TextSource) and isinstance(text.outputs.logits, TopkLogits)
    # No `mode` means full logits, as configs written before the modes existed say.
    untagged = PrecomputeConfig.model_validate({"source": {"kind": "digits"}, "teacher": {"factory": "m:f"},
                                                "outputs": {"logits": {"dtype": "float32"}}})
    assert untagged.outputs.logits == FullLogits(dtype="float32")


def test_a_relative_precompute_is_relative_to_the_config_that_names_it(tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    shutil.copy("jobs/configs/digits/precompute.yaml", folder / "pre.yaml")
    (folder / "train.yaml").write_text("precompute: pre.yaml\nstudent: {factory: pipeline.models.builtin:mlp}\n")
    monkeypatch.chdir(tmp_path)  # anywhere but the config's folder
    assert load_train_config("project/configs/train.yaml").precompute == str(folder / "pre.yaml")
    # A value given with --set is relative to where the command was typed.
    assert load_train_config("project/configs/train.yaml", ["precompute=project/configs/pre.yaml"]).precompute == str(folder / "pre.yaml")
    (folder / "broken.yaml").write_text("precompute: missing.yaml\nstudent: {factory: pipeline.models.builtin:mlp}\n")
    with pytest.raises(DistillError) as e:
        load_train_config("project/configs/broken.yaml")
    assert "config project/configs/broken.yaml names `precompute: " in e.value.problem and "does not exist" in e.value.problem
    assert str(folder) in e.value.fix
