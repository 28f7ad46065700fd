"""infer.py and eval.py on real files: coatnet_tiny trained for a few epochs on the bundled digits with the demo
recipe and exported by export.py to MINDIR and ONNX without model flags. Every format classifies the digits val
JPEGs as eval.py does, names the classes by the training folders (a --class_names file wins), and bad inputs
are named, skipped and counted."""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from runs import ROOT, run

from src.checkpoint import read_metadata, save_checkpoint

DIGITS = [f"digit_{d}" for d in range(10)]


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in res.stderr.strip().splitlines() if ln and not ln.startswith("[WARNING]")]


def infer(tmp_path, model: str, *args: str, check: bool = True, name: str = "predictions.json"):
    """infer.py with --output=tmp_path/name; returns (process, the file's JSON or CSV rows, None if not written)."""
    out = tmp_path / name
    res = run("infer.py", f"--checkpoint_path={model}", f"--output={out}", *args, check=check)
    if not out.exists():
        return res, None
    if name.endswith(".csv"):
        return res, list(csv.reader(open(out)))
    return res, json.load(open(out))


def by_file(output: dict) -> dict[str, list[dict]]:
    return {p["file"]: p["topk"] for p in output["predictions"]}


def eval_top(res: subprocess.CompletedProcess) -> tuple[float, float]:
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("top1:")][-1]
    return float(line.split()[1]), float(line.split()[3])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    data = str(root / "digits")
    # 48x48 JPEGs for the 32x32 model: the eval resize is part of what infer.py must reproduce
    prepared = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_demo_data.py"),
                               "--output", data, "--size", "48"], capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr
    out = str(root / "run")
    # The demo recipe, shortened to 4 epochs of batch 8 (~20-50 % top-1, enough for the outputs to depend on the
    # image): from coatnet_tiny's N(0, 0.01) init a small lr learns from the first epoch on the seeds tried (1, 2,
    # 3, 42), while the demo's 0.004 (meant for 30 epochs) mostly leaves 4 epochs predicting one class.
    run("train.py", "--config_path=configs/demo.yaml", f"--data_path={data}", f"--output_path={out}",
        "--num_epochs=4", "--batch_size=8", "--lr_max=0.0005", "--lr_warmup_epochs=0", "--rand_augment_num_layers=0",
        "--label_smoothing=0", "--eval_interval=4")
    ckpt = os.path.join(out, "checkpoints", "epoch_0004.ckpt")
    recorded_by_trainer = read_metadata(ckpt).get("class_names")
    exports = {}
    for file_format in ("MINDIR", "ONNX"):  # no model flags: export.py reads them from the checkpoint's metadata
        res = run("export.py", f"--checkpoint_path={ckpt}", f"--file_format={file_format}",
                  f"--file_name={root / 'tiny'}")
        exports[file_format] = res.stdout.strip().splitlines()[-1]
    return types.SimpleNamespace(data=data, val=os.path.join(data, "val"), ckpt=ckpt, out=out, root=root,
                                 mindir=exports["MINDIR"], onnx=exports["ONNX"],
                                 recorded_by_trainer=recorded_by_trainer)


@pytest.fixture(scope="module")
def checkpoint_eval(demo):
    """eval.py on the checkpoint, with no model flags (they come from its metadata)."""
    return eval_top(run("eval.py", f"--checkpoint_path={demo.ckpt}", f"--data_path={demo.data}",
                        f"--output_path={demo.root / 'eval_ckpt'}"))


@pytest.fixture(scope="module")
def predictions(demo, tmp_path_factory):
    """infer.py on the val folder with each format, all 10 probabilities per image."""
    results = {}
    for kind, model in (("checkpoint", demo.ckpt), ("MINDIR", demo.mindir), ("ONNX", demo.onnx)):
        res, output = infer(tmp_path_factory.mktemp(kind), model, f"--input={demo.val}", "--topk=10")
        assert output["format"] == kind and not output["skipped"]
        results[kind] = types.SimpleNamespace(res=res, output=output, files=by_file(output))
    return results


def probabilities(topk: list[dict]) -> np.ndarray:
    p = np.zeros(len(topk))
    for entry in topk:
        p[entry["index"]] = entry["probability"]
    return p


def eval_pipeline_logits(demo) -> dict[str, np.ndarray]:
    """Logits per val file as eval.py computes them: its model (`open_model`) over its pipeline
    (`dataset_from_config`), rows matched to files through the bytes the pipeline reads, in its order."""
    import mindspore.dataset as ds

    from src.dataset import IMAGE_EXTENSIONS, dataset_from_config
    from src.model_utils.config import load_config
    from src.predict import open_model

    config = load_config([f"--checkpoint_path={demo.ckpt}", f"--data_path={demo.data}", "--num_parallel_workers=2"])
    model = open_model(config)
    rows = [model.net(images).asnumpy() for images, _ in
            dataset_from_config(config, "val").create_tuple_iterator(num_epochs=1, output_numpy=False)]
    logits = np.concatenate(rows)
    raw = ds.ImageFolderDataset(demo.val, decode=False, shuffle=False, extensions=list(IMAGE_EXTENSIONS),
                                class_indexing={name: i for i, name in enumerate(DIGITS)})
    files = sorted(os.path.join(demo.val, c, f) for c in DIGITS for f in os.listdir(os.path.join(demo.val, c)))
    contents = {}
    for path in files:
        contents.setdefault(open(path, "rb").read(), []).append(path)
    out = {}
    for row, (data, _) in enumerate(raw.create_tuple_iterator(num_epochs=1, output_numpy=True)):
        for path in contents[data.tobytes()]:  # identical scans give identical files
            out[path] = logits[row]
    assert len(out) == len(files) == len(logits)
    return out


@pytest.mark.slow
def test_checkpoint_top1_agrees_with_eval_for_every_image(demo, predictions, checkpoint_eval, tmp_path):
    ckpt = predictions["checkpoint"]
    assert "355/355 images" in ckpt.res.stderr and "classified 355 images, skipped 0 inputs" in ckpt.res.stderr
    reference = eval_pipeline_logits(demo)
    assert set(ckpt.files) == set(reference)
    top1 = {}
    for path, topk in ckpt.files.items():
        top1[path] = topk[0]["index"]
        assert top1[path] == int(np.argmax(reference[path])), path
        z = reference[path].astype(np.float64)
        np.testing.assert_allclose(probabilities(topk), np.exp(z - z.max()) / np.exp(z - z.max()).sum(),
                                   rtol=0, atol=1e-5)
    # The comparison has teeth: the predictions differ between images, and another resize (bilinear for the
    # 48 -> 32 pixels) moves the probabilities far beyond the tolerance.
    assert len(set(top1.values())) >= 3
    _, other = infer(tmp_path, demo.ckpt, f"--input={demo.val}", "--topk=10", "--interpolation=bilinear")
    assert max(np.abs(probabilities(topk) - probabilities(ckpt.files[path])).max()
               for path, topk in by_file(other).items()) > 1e-3
    # ... and the same counts eval.py printed for the checkpoint
    labels = {path: DIGITS.index(os.path.basename(os.path.dirname(path))) for path in top1}
    top5 = {path: [e["index"] for e in ckpt.files[path][:5]] for path in top1}
    assert sum(top1[p] == labels[p] for p in top1) == round(checkpoint_eval[0] * len(top1))
    assert sum(labels[p] in top5[p] for p in top1) == round(checkpoint_eval[1] * len(top1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["MINDIR", "ONNX"])
def test_exports_classify_every_image_as_the_checkpoint(predictions, kind):
    ckpt, export = predictions["checkpoint"].files, predictions[kind].files
    assert set(export) == set(ckpt)
    for path in ckpt:
        assert export[path][0]["index"] == ckpt[path][0]["index"], path
        np.testing.assert_allclose(probabilities(export[path]), probabilities(ckpt[path]), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_class_names_are_the_training_folders_without_flags(demo, predictions):
    for kind, result in predictions.items():
        for path, topk in result.files.items():
            assert [e["name"] for e in topk] == [DIGITS[e["index"]] for e in topk], (kind, path)
        table = result.res.stdout.splitlines()
        assert table[0].split() == ["file", "rank", "index", "probability", "class"]
        assert table[1].split()[0] in result.files and table[1].split()[-1] in DIGITS
    assert read_metadata(demo.onnx)["class_names"] == DIGITS  # export.py carried them over


@pytest.mark.slow
def test_training_records_the_class_folder_names(demo):
    assert demo.recorded_by_trainer == DIGITS


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["checkpoint", "ONNX"])
def test_a_class_names_file_wins(demo, tmp_path, kind):
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    names = tmp_path / "names.txt"
    names.write_text("\n".join(words) + "\n\n")
    model = demo.ckpt if kind == "checkpoint" else demo.onnx
    images = os.path.join(demo.val, "digit_7")
    res, rows = infer(tmp_path, model, f"--input={images}", f"--class_names={names}", "--topk=3",
                      name="predictions.csv")
    assert rows[0] == ["file", "index_1", "name_1", "probability_1", "index_2", "name_2", "probability_2",
                       "index_3", "name_3", "probability_3"]
    assert len(rows) - 1 == len(os.listdir(images))
    for row in rows[1:]:
        assert [row[2], row[5], row[8]] == [words[int(row[1])], words[int(row[4])], words[int(row[7])]]
    assert any(w in res.stdout.split() for w in words)
    names.write_text("\n".join(words[:9]) + "\n")  # one short: another model's list
    res, _ = infer(tmp_path, model, f"--input={images}", f"--class_names={names}", check=False, name="short.json")
    assert res.returncode == 2 and error_lines(res) == [
        f"error: config key 'class_names': {names} has 9 names but the model has 10 classes"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["MINDIR", "ONNX"])
def test_eval_on_an_export_gives_the_checkpoints_top1_and_top5(demo, checkpoint_eval, kind):
    model = demo.mindir if kind == "MINDIR" else demo.onnx
    out = demo.root / f"eval_{kind}"
    got = eval_top(run("eval.py", f"--checkpoint_path={model}", f"--data_path={demo.data}", f"--output_path={out}"))
    assert got == checkpoint_eval
    result = json.load(open(out / "eval_result.json"))
    assert result["format"] == kind and result["num_samples"] == 355 and result["crop_pct"] == 1.0


@pytest.fixture(scope="module")
def bad_inputs(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    good = sorted(os.listdir(os.path.join(demo.val, "digit_3")))[:2]
    for name in good:
        shutil.copy(os.path.join(demo.val, "digit_3", name), folder / name)
    jpeg = (folder / good[0]).read_bytes()
    (folder / "cut.JPEG").write_bytes(jpeg[:300])  # cut inside the header: fatal to MindSpore's native decoder
    (folder / "notes.txt").write_text("not a picture\n")
    missing = str(folder / "gone.jpg")
    return folder, [str(folder / n) for n in good], [str(folder / "cut.JPEG"), str(folder / "notes.txt"), missing]


@pytest.mark.slow
def test_bad_inputs_are_named_skipped_and_counted(demo, bad_inputs, tmp_path):
    folder, good, bad = bad_inputs
    res, output = infer(tmp_path, demo.onnx, f"--input={','.join(bad[:1] + good + bad[1:])}")
    assert res.returncode == 0, res.stderr
    assert [p["file"] for p in output["predictions"]] == good
    skipped = {s["file"]: s["reason"] for s in output["skipped"]}
    assert set(skipped) == set(bad)
    assert skipped[bad[2]] == "no such file or folder"
    assert skipped[bad[1]] == "not an image file (or a format PIL cannot read)"
    assert skipped[bad[0]].startswith("corrupt image (")
    lines = error_lines(res)
    for path in bad:
        assert [ln for ln in lines if path in ln] == [f"skipped {path}: {skipped[path]}"]
    assert lines[-1].startswith("classified 2 images, skipped 3 inputs")
    assert "Traceback" not in res.stderr
    # a folder: only image names are taken (notes.txt is not), the damaged JPEG still counts
    res, output = infer(tmp_path, demo.onnx, f"--input={folder}", name="folder.json")
    assert [s["file"] for s in output["skipped"]] == [bad[0]] and len(output["predictions"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1, 2], ids=["corrupt", "text", "missing"])
def test_strict_stops_at_a_bad_input_with_exit_1(demo, bad_inputs, tmp_path, which):
    _, good, bad = bad_inputs
    res, output = infer(tmp_path, demo.ckpt, f"--input={good[0]},{bad[which]},{good[1]}", "--strict=True",
                        check=False)
    assert res.returncode == 1 and output is None
    lines = error_lines(res)
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad[which]}: ") and "--strict=True" in lines[0]


@pytest.mark.slow
def test_a_model_metadata_mismatch_is_one_line_and_exit_2(demo, tmp_path):
    model = str(tmp_path / "tiny.onnx")
    shutil.copy(demo.onnx, model)
    meta = read_metadata(demo.onnx)
    image = os.path.join(demo.val, "digit_0")
    cases = [([f"--checkpoint_path={model}", "--image_height=64"],
              f"config key 'image_height': 64 but {model} has image_height=32 (an export's shapes are fixed)"),
             ([f"--checkpoint_path={demo.ckpt}", "--model_name=coatnet_0"],
              f"{demo.ckpt} as coatnet_0 with num_classes=10: tensor '"),
             ([f"--checkpoint_path={model}"], f"{model}.json says num_classes=5 but {model} has num_classes=10")]
    for args, message in cases:
        with open(model + ".json", "w") as f:
            json.dump({**meta, "num_classes": 5} if args == [f"--checkpoint_path={model}"] else meta, f)
        res = run("infer.py", f"--input={image}", *args, check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        lines = error_lines(res)
        assert len(lines) == 1 and lines[0].startswith("error: " + message), lines


def test_a_1000_class_model_prints_imagenet_names(tmp_path):
    from jpeg_tree import make_jpeg_tree

    from src.coatnet import create_model
    from src.predict import imagenet_class_names

    images = make_jpeg_tree(str(tmp_path / "images"), num_classes=1, per_class=2, splits=("val",))
    net = create_model("coatnet_tiny", num_classes=1000, image_size=32)
    ckpt = str(tmp_path / "imagenet_tiny.ckpt")
    save_checkpoint({p.name: p.asnumpy() for p in net.get_parameters()}, ckpt,
                    metadata={"model_name": "coatnet_tiny", "num_classes": 1000, "image_height": 32,
                              "image_width": 32})
    res, output = infer(tmp_path, ckpt, f"--input={images}", "--topk=3")
    imagenet = imagenet_class_names()
    assert len(output["predictions"]) == 2
    for p in output["predictions"]:
        assert [e["name"] for e in p["topk"]] == [imagenet[e["index"]] for e in p["topk"]]
    first = output["predictions"][0]["topk"][0]
    assert f"{first['index']:>5}" in res.stdout and imagenet[first["index"]] in res.stdout


def test_the_shipped_imagenet_names_are_timms_in_class_order():
    import importlib.resources

    from src.predict import imagenet_class_names

    info = importlib.resources.files("timm.data") / "_info"
    lemma = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    synsets = (info / "imagenet_synsets.txt").read_text().split()
    names = imagenet_class_names()
    assert len(names) == 1000 and names == [lemma[s].strip() for s in synsets]
    assert names[0] == "tench, Tinca tinca" and names[999] == "toilet tissue, toilet paper, bathroom tissue"


@pytest.fixture(scope="module")
def oblong_tree(tmp_path_factory) -> str:
    from jpeg_tree import make_jpeg_tree

    return make_jpeg_tree(str(tmp_path_factory.mktemp("oblong")), num_classes=2, per_class=3, size=(40, 56))


def _eager_preprocessing(config, root: str) -> np.ndarray:
    from src.image_decode import native_image_bytes
    from src.predict import image_transform

    transform = image_transform(config)
    files = sorted(os.path.join(root, "val", c, f) for c in sorted(os.listdir(os.path.join(root, "val")))
                   for f in sorted(os.listdir(os.path.join(root, "val", c))))
    return np.stack([transform(native_image_bytes(open(path, "rb").read())) for path in files])


@pytest.mark.parametrize("extra", [[], ["--eval_resize=aspect"], ["--model_name=coatnet_0_224"],
                                   ["--center_crop=False"], ["--interpolation=bilinear", "--crop_pct=0.9"]],
                         ids=["original-squash", "aspect", "timm-auto-aspect", "plain-resize", "bilinear"])
def test_infer_preprocesses_an_oblong_image_as_the_val_pipeline(oblong_tree, extra):
    from src.dataset import dataset_from_config
    from src.model_utils.config import load_config

    config = load_config([f"--data_path={oblong_tree}", "--num_classes=2", "--image_height=32", "--image_width=32",
                          "--num_parallel_workers=1", *extra])
    pipeline = np.concatenate([images for images, _ in dataset_from_config(config, "val", batch_size=4)
                               .create_tuple_iterator(num_epochs=1, output_numpy=True)])
    np.testing.assert_array_equal(_eager_preprocessing(config, oblong_tree), pipeline)


def test_the_eval_resize_modes_differ_on_an_oblong_image(oblong_tree):
    from src.model_utils.config import load_config

    squash, aspect = (_eager_preprocessing(load_config(["--image_height=32", "--image_width=32", f"--eval_resize={m}"]),
                                           oblong_tree) for m in ("squash", "aspect"))
    assert np.abs(squash - aspect).max() > 0.1  # so the comparison above can tell them apart


def test_inputs_expand_files_folders_recursively_and_globs(tmp_path):
    from src.predict import expand_inputs

    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jpg", "a/b/y.PNG", "a/b/notes.txt", "a/.hidden.jpg", "z.jpeg"):
        (tmp_path / name).write_bytes(b"")
    files, missing = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.jpeg"), str(tmp_path / "a" / "x.jpg"),
                                    str(tmp_path / "nope"), str(tmp_path / "*.gif")])
    assert files == [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "a" / "b" / "y.PNG"), str(tmp_path / "z.jpeg")]
    assert missing == [(str(tmp_path / "nope"), "no such file or folder"),
                       (str(tmp_path / "*.gif"), "no file matches this pattern")]


def test_progress_is_one_line_per_interval_when_not_a_terminal():
    from src.predict import Progress

    stream = io.StringIO()
    progress = Progress(300, stream=stream, interval=3600.0)
    for _ in range(3):
        progress.update(100)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("300/300 images (100 %")
