import re

import pytest

from binllm.config import ConfigError, load_config


def test_repo_default_config_loads_and_overrides_apply(tmp_path):
    cfg = load_config("ray_config.yaml", ["tune.stage1.epochs=3", "encoder.lr=0.5", "run.name=abc"])
    assert cfg.tune.stage1.epochs == 3 and cfg.encoder.lr == 0.5
    assert cfg.run_dir().endswith("/abc")
    assert cfg.tune.lora.r == 8 and cfg.tune.lora.target_modules == ["q_proj", "v_proj"]


def test_nested_sections_keep_defaults_for_keys_left_out(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tune:\n  stage1:\n    epochs: 2\n")
    cfg = load_config(path)
    assert cfg.tune.stage1.epochs == 2 and cfg.tune.stage1.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("override, message", [
    ("encoder.lrr=1", "unknown config key 'encoder.lrr'"),
    ("encoder.lr=abc", "config key 'encoder.lr': expected a number"),
    ("prompt.kind=zzz", "config key 'prompt.kind': expected one of"),
    ("tune.lora=3", "config key 'tune.lora': expected a mapping"),
    ("encoder.bits=12", "config key 'encoder.bits': expected a positive multiple of 8"),
    ("data.split.fractions=[0.5,0.2]", "data.split.fractions"),
    ("nokey", "expected key=value"),
    ("encoder.vocabulary=every", "config key 'encoder.vocabulary': expected one of"),
    ("paper.methods=[XX]", "config key 'paper.methods': expected some of"),
    ("paper.blend=[TO]", "config key 'paper.blend': expected some of ['IO', 'IT', 'BinLLM']"),
    ("paper.blend_valid_rows=-1", "config key 'paper.blend_valid_rows': expected >= 0"),
    ("prompt.max_tokens=-1", "config key 'prompt.max_tokens': expected >= 0"),
    ("prompt.max_title_tokens=-5", "config key 'prompt.max_title_tokens': expected >= 0"),
    ("tune.lora.top_layers=-1", "config key 'tune.lora.top_layers': expected >= 0"),
    ("tune.stage2.distill=1.5", "config key 'tune.stage2.distill': expected a weight in [0, 1]"),
    ("tune.stage1.distill=-0.1", "config key 'tune.stage1.distill': expected a weight in [0, 1]"),
    ("tune.stage2.distill_end=1.2", "config key 'tune.stage2.distill_end': expected a weight in [0, 1], got 1.2"),
    ("tune.stage2.distill_teacher=bits", "config key 'tune.stage2.distill_teacher': expected one of "
                                         "['inner_product', 'code_bits'], got 'bits'"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_unknown_top_level_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("encodr:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'encodr'"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_ray_config_yaml_documents_every_key():
    import dataclasses

    import yaml

    from binllm.config import Config

    def keys(node, prefix=""):
        out = set()
        for name, value in node.items():
            key = f"{prefix}{name}"
            out |= keys(value, f"{key}.") if isinstance(value, dict) else {key}
        return out

    with open("ray_config.yaml") as handle:
        documented = keys(yaml.safe_load(handle))
    assert documented == keys(dataclasses.asdict(Config()))


def test_config_files_layer_and_mapping_overrides_merge(tmp_path):
    base, preset = tmp_path / "base.yaml", tmp_path / "preset.yaml"
    base.write_text("tune:\n  stage1: {lr: 0.5, epochs: 3}\nencoder: {dim: 16}\n")
    preset.write_text("tune:\n  stage1: {epochs: 7}\n")
    cfg = load_config([base, preset], ["tune.stage1={micro_batch_tokens: -1}"])
    assert (cfg.tune.stage1.lr, cfg.tune.stage1.epochs, cfg.tune.stage1.micro_batch_tokens) == (0.5, 7, -1)
    assert cfg.encoder.dim == 16


def test_paper_presets_load_with_the_official_settings():
    cfg = load_config(["ray_config.yaml", "cluster/presets/paper_ml1m.yaml", "cluster/presets/paper_ml1m_gpu.yaml"])
    assert (cfg.data.warm_min_train, cfg.encoder.vocabulary, cfg.encoder.shared_mask) == (4, "all", True)
    assert (cfg.encoder.weight_decay, cfg.encoder.patience, cfg.encoder.mf_dim) == (0.001, 100, 256)
    assert cfg.prompt.code_format == "binary" and cfg.tune.stage2.micro_batch_tokens == 16384
    cpu = load_config(["ray_config.yaml", "cluster/presets/paper_ml1m.yaml", "cluster/presets/paper_ml1m_cpu.yaml"])
    assert cpu.tune.stage1.max_train_rows > 0 and cpu.paper.max_test_rows > 0
    assert (cpu.tune.stage2.epochs, cpu.tune.stage2.distill, cpu.tune.stage1.distill) == (3, 0.9, 0.0)
    assert cpu.tune.stage2.distill_teacher == "code_bits"
    assert load_config("ray_config.yaml").tune.stage2.distill_teacher == "inner_product"


def test_demo_preset_only_resizes_the_defaults_and_distills_stage2():
    base = load_config("ray_config.yaml")
    demo = load_config(["ray_config.yaml", "cluster/presets/demo_cpu.yaml"])
    assert (demo.data.format, demo.tune.stage2.max_train_rows, demo.demo.max_test_rows) == ("demo_ml1m", 1000, 2000)
    assert (demo.tune.stage2.distill, demo.tune.stage1.distill, base.tune.stage2.distill) == (0.9, 0.0, 0.0)
    assert (demo.tune.stage2.epochs, demo.tune.stage2.eval_every, demo.tune.stage2.distill_teacher) == (3, 0, "code_bits")
    assert (demo.tune.lora.top_layers, demo.tune.lora.dropout, base.tune.lora.dropout) == (8, 0.0, 0.05)
    assert (demo.tune.stage2.lr, demo.tune.stage2.min_lr, base.tune.stage2.lr) == (0.004, 0.0004, 0.002)
    assert (demo.tune.stage1.lr, demo.encoder.vocabulary, demo.prompt.code_format) == (
        base.tune.stage1.lr, base.encoder.vocabulary, base.prompt.code_format)


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".hidden", "x" * 129, "run name"])
def test_run_names_that_would_leave_the_output_root_are_refused(name):
    with pytest.raises(ConfigError, match="config key 'run.name'"):
        load_config(None, [f"run.name={name}"])


def test_score_dt_must_be_a_date():
    with pytest.raises(ConfigError, match="config key 'score.dt': expected a date YYYY-MM-DD"):
        load_config(None, ["score.dt=../2026-11-27"])
    assert load_config(None, ["score.dt=2026-11-27", "run.name=ok.v2_x-1"]).score.dt == "2026-11-27"
