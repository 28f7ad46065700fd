"""The original MindSpore CoAtNet's configuration runs unchanged: its default_config.yaml (all three
documents, every key and value, written here as data) and its typical command-line overrides load, its
aliases mean our keys, its no-effect keys are named in one warning line, and a tiny epoch trains from it."""
import json
import os

import pytest
from runs import TINY, make_color_tree, run

from src.model_utils.config import ALIASES, NO_EFFECT, ConfigError, load_config

# hw666666666666/CoAtNet default_config.yaml, as its users have it (values, descriptions, choices).
ORIGINAL_YAML = """\
enable_modelarts: True
data_url: ""
multi_data_url: ""
train_url: ""
ckpt_url: ""
result_url: ""
data_path: "/home/work/user-job-dir/data/"
output_path: "/home/work/user-job-dir/model/"
load_path: "/home/work/user-job-dir/checkpoint.ckpt"
result_path: ""
checkpoint_path: ""
device_target: Ascend
enable_profiling: False
enable_graph_kernel: False
modelarts_dataset_unzip_name: 'imagenet'
need_modelarts_dataset_unzip: False
architecture: "coatnet_1"
num_classes: 1000
image_height: 224
image_width: 224
center_crop: True
num_parallel_workers: 16
batch_size: 64
rand_augment_num_layers: 2
rand_augment_magnitude: 15
mixup_alpha: 0.8
num_epochs: 300
lr_max: 0.001
lr_min: 0.00001
lr_warmup_epochs: 20
epsilon: 0.000001
weight_decay: 0.05
enable_ema: False
ema_decay: 0.9999
enable_clip_norm: True
gradient_norm: 1.0
label_smoothing: 0.1
save_checkpoint: True
save_checkpoint_epochs: 1
keep_checkpoint_max: 50
save_checkpoint_path: "/home/work/user-job-dir/model/"
device_id: 0
rank_id: 0
rank_size: 1
run_distribute: True
run_eval: True
activation: "Softmax"
dataset_path: ""
pretrain_ckpt: ""
freeze_layer: ""
filter_head: False
enable_cache: False
cache_session_id: ""
is_training: True
is_training_eval: False
run_distribute_eval: False
device_id_export: 0
batch_size_export: 1
ckpt_file: ""
file_name: "CoAtNet"
file_format: "MINDIR"
is_training_export: False
run_distribute_export: False
batch_size_postprocess: 1
label_path: ''

---
enable_modelarts: 'Whether training on modelarts, default: False'
data_url: 'Dataset url for obs'
train_url: 'Training output url for obs'
file_format: 'file format'

---
platform: ['Ascend', 'GPU', 'CPU']
file_format: ["AIR", "ONNX", "MINDIR"]
freeze_layer: ["", "none", "backbone"]
"""


@pytest.fixture()
def original_yaml(tmp_path) -> str:
    path = tmp_path / "default_config.yaml"
    path.write_text(ORIGINAL_YAML)
    return str(path)


def test_the_originals_yaml_and_overrides_load_with_its_meanings(original_yaml, capsys):
    c = load_config([f"--config_path={original_yaml}", "--architecture=coatnet_0", "--run_eval=True",
                     "--load_path=/ckpt/coatnet_0-300.ckpt"])
    assert c.model_name == "coatnet_0"  # architecture
    assert c.pretrained == "/ckpt/coatnet_0-300.ckpt"  # load_path (pretrain_ckpt "" sets nothing)
    assert c.eval_interval == 1  # run_eval
    assert c.data_path == "/home/work/user-job-dir/data/"  # dataset_path "" sets nothing
    assert c.keep_checkpoint_max == 50 and c.save_checkpoint and c.batch_size_export == 1
    assert c.save_checkpoint_path == "/home/work/user-job-dir/model/" and c.file_name == "CoAtNet"
    assert c.enable_modelarts and c.device_target == "Ascend" and c.num_parallel_workers == 16
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1
    given = [k for k in NO_EFFECT if f"\n{k}:" in "\n" + ORIGINAL_YAML.split("---")[0]]
    assert len(given) == len(NO_EFFECT)  # the original's file holds every one of them
    for key in given:
        assert f"{key}: {NO_EFFECT[key]}" in warnings[0], key


@pytest.mark.parametrize("alias, ours, value", [
    ("architecture", "model_name", "coatnet_2"), ("dataset_path", "data_path", "/data/imagenet"),
    ("pretrain_ckpt", "pretrained", "/a.ckpt"), ("load_path", "pretrained", "/b.ckpt"),
    ("ckpt_url", "checkpoint_url", "obs://b/c.ckpt"), ("ckpt_file", "checkpoint_path", "/c.ckpt")])
def test_each_alias_sets_our_key(alias, ours, value):
    assert ALIASES[alias] == ours
    assert getattr(load_config([f"--{alias}={value}"]), ours) == value
    assert f"--{alias}" not in load_config([f"--{alias}={value}"]).to_dict()


@pytest.mark.parametrize("argv, message", [
    (["--architecture=coatnet_0", "--model_name=coatnet_2"],
     "command line: 'architecture' ('coatnet_0') and 'model_name' ('coatnet_2') set the same key 'model_name'"),
    (["--run_eval=False", "--eval_interval=2"], "command line: 'run_eval' ('False') contradicts 'eval_interval'"),
])
def test_contradicting_spellings_are_one_line(argv, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_run_eval_false_means_no_evaluation_and_the_same_value_twice_is_fine():
    assert load_config(["--run_eval=False"]).eval_interval == 0
    assert load_config(["--architecture=coatnet_0", "--model_name=coatnet_0"]).model_name == "coatnet_0"


@pytest.mark.slow
def test_a_tiny_epoch_trains_from_the_originals_configuration(original_yaml, tmp_path):
    data = make_color_tree(str(tmp_path / "data"))
    out, ckpts = tmp_path / "out", tmp_path / "ckpts"
    tiny = [a for a in TINY if not a.startswith("--model_name")]
    res = run("train.py", f"--config_path={original_yaml}", "--enable_modelarts=False", "--device_target=CPU",
              "--architecture=coatnet_tiny", f"--dataset_path={data}", f"--output_path={out}",
              f"--save_checkpoint_path={ckpts}", "--run_eval=True", "--num_classes=3", "--num_epochs=1",
              "--batch_size=4", "--lr_warmup_epochs=0", *tiny)
    assert sorted(os.listdir(ckpts)) == ["best.ckpt", "best.ckpt.json", "epoch_0001.ckpt", "epoch_0001.ckpt.json"]
    assert not (out / "checkpoints").exists()  # save_checkpoint_path moved them
    epoch = [json.loads(ln) for ln in open(out / "metrics.jsonl") if '"epoch"' in ln][-1]
    assert "top1" in epoch  # run_eval
    assert "warning: config keys with no effect here: " in res.stderr and "enable_graph_kernel: " in res.stderr
    # save_checkpoint=False writes none; enable_profiling writes MindSpore's profile.
    out2 = tmp_path / "out2"
    run("train.py", f"--config_path={original_yaml}", "--enable_modelarts=False", "--device_target=CPU",
        "--architecture=coatnet_tiny", f"--dataset_path={data}", f"--output_path={out2}", "--save_checkpoint_path=",
        "--save_checkpoint=False", "--enable_profiling=True", "--run_eval=False", "--num_classes=3",
        "--num_epochs=1", "--batch_size=4", "--lr_warmup_epochs=0", *tiny)
    assert not (out2 / "checkpoints").exists() and os.listdir(out2 / "profiler")
    assert not [ln for ln in open(out2 / "metrics.jsonl") if '"top1"' in ln]
