"""The export folder contract: an export never replaces a folder of other files, and a damaged or mismatched export
is refused in one line that names the file and what is wrong."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from trainer.export import CONFIG, WEIGHTS, ExportError, load_export, write_export, write_safetensors
from trainer.families.image_gpt import ImageGPTConfig, ImageGPTFamily
from trainer.transformer import TransformerConfig


def tiny(d_model: int = 16) -> tuple[ImageGPTFamily, dict]:
    fam = ImageGPTFamily(ImageGPTConfig(transformer=TransformerConfig(n_layer=2, n_head=2, d_model=d_model)), {})
    return fam, {k: m.state_dict() for k, m in fam.build_modules().items()}


def edit_config(out: str, change) -> None:
    path = os.path.join(out, CONFIG)
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(change(config), f)


def test_export_replaces_an_earlier_export_but_never_a_folder_of_other_files(tmp_path):
    fam, states = tiny()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=f"{run}: holds 2 entries and is not an earlier export"):
        write_export(str(run), fam, states)
    assert (run / "notes.txt").read_text() == "keep me" and (run / "checkpoints").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no scratch left
    mine = tmp_path / "ex1.partial"  # a folder of the user's own, named like the old scratch: never touched
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    write_export(str(tmp_path / "ex1"), fam, states)
    assert (mine / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex1", "ex1.partial", "run"]
    assert (tmp_path / "ex1").stat().st_mode & 0o777 == 0o777 & ~_umask()  # published with the usual mode
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="exists and is not a folder"):
        write_export(str(tmp_path / "file"), fam, states)
    (tmp_path / "empty").mkdir()
    write_export(str(tmp_path / "empty"), fam, states)
    out = write_export(str(tmp_path / "export"), fam, states, {"step": 1})
    (tmp_path / "export" / "samples.png").write_bytes(b"a grid dgm sample wrote here")
    (tmp_path / "export" / "notes").mkdir()
    (tmp_path / "export" / "notes" / "eval.txt").write_text("keep me")
    write_export(out, fam, states, {"step": 2})  # the export's own files are replaced, the user's stay
    assert load_export(out)[2]["step"] == 2
    assert (tmp_path / "export" / "samples.png").read_bytes() == b"a grid dgm sample wrote here"
    assert (tmp_path / "export" / "notes" / "eval.txt").read_text() == "keep me"
    # A write that crashed after setting the earlier export aside left the user's grid there: the next write
    # carries it over and removes the rest; a folder of that name pattern that is not an export is left alone.
    stranded = tmp_path / "export.old-0123456789ab"
    write_export(str(stranded), fam, states, {"step": 0})
    (stranded / "old-grid.png").write_bytes(b"stranded")
    (tmp_path / "export.old-backup").mkdir()
    (tmp_path / "export.old-backup" / "mine.txt").write_text("not an export")
    fam.export_files = lambda: {"extra/notes.json": b"{}"}  # a family with files of its own (tokenizer, dVAE)
    write_export(out, fam, states, {"step": 2})
    assert (tmp_path / "export" / "old-grid.png").read_bytes() == b"stranded" and not stranded.exists()
    assert (tmp_path / "export" / "extra" / "notes.json").read_bytes() == b"{}"
    assert (tmp_path / "export.old-backup" / "mine.txt").read_text() == "not an export"
    shutil.rmtree(tmp_path / "export.old-backup")
    wider, wide_states = tiny(d_model=32)  # weights that do not load into the family written beside them
    with pytest.raises(ExportError, match="weights of 'model' do not fit"):
        write_export(out, fam, wide_states, {"step": 3})
    assert load_export(out)[2]["step"] == 2  # the earlier export is untouched
    assert sorted(os.listdir(tmp_path)) == ["empty", "ex1", "ex1.partial", "export", "file", "run"]  # no scratch or .old left


def test_an_export_published_to_s3_loads_and_samples_from_there(tmp_path, s3_bucket, capsys):
    from data_pipeline import storage
    from launch.cli import main
    from launch.export import check_remote_replaceable, publish_remote
    from trainer.export import load_export_url

    fam, states = tiny()
    url = f"{s3_bucket}/exports/igpt"
    for step in (1, 2):  # published, then replaced whole
        local = write_export(str(tmp_path / f"export{step}"), fam, states, {"step": step})
        check_remote_replaceable(url)
        publish_remote(local, url)
    storage.write_bytes(f"{url}/samples.png", b"x")  # an object the export does not list: the user's, kept
    listed = write_export(str(tmp_path / "export3"), fam, states, {"step": 3})
    (tmp_path / "export3" / "extra.bin").write_bytes(b"e")  # a file only this export lists
    edit_config(listed, lambda c: {**c, "files": {**c["files"], "extra.bin": hashlib.sha256(b"e").hexdigest()}})
    publish_remote(listed, url)
    publish_remote(str(tmp_path / "export2"), url)
    assert not storage.exists(f"{url}/extra.bin") and storage.exists(f"{url}/samples.png")
    loaded, modules, config = load_export_url(url)
    assert config["step"] == 2 and sorted(modules) == ["model"]
    png = str(tmp_path / "s.png")
    assert main(["sample", url, "--out", png, "--n", "2"]) == 0 and os.path.getsize(png) > 100
    real_upload = storage.upload_file

    def cut(local: str, target: str) -> None:  # the connection drops before config.json is up
        if target.endswith("/config.json"):
            raise OSError("connection reset (injected)")
        real_upload(local, target)

    publish_remote(listed, url)  # the export the cut publish replaces lists extra.bin
    storage.upload_file = cut
    try:
        with pytest.raises(OSError, match="injected"):
            publish_remote(str(tmp_path / "export1"), url)
    finally:
        storage.upload_file = real_upload
    with pytest.raises(ExportError, match=rf"{url}: not an export \(no {CONFIG}\)"):
        load_export_url(url)  # half published: never loads
    check_remote_replaceable(url)  # but it is ours: a retry may replace it
    publish_remote(str(tmp_path / "export1"), url)
    assert load_export_url(url)[2]["step"] == 1 and not storage.exists(f"{url}/.dgm-publishing")
    # the retry still knew what the replaced export held (its config.json was gone): its extra.bin is removed
    assert not storage.exists(f"{url}/extra.bin") and storage.exists(f"{url}/samples.png")
    storage.write_bytes(f"{s3_bucket}/other/data.bin", b"x")
    with pytest.raises(ExportError, match="holds 1 objects and is not an earlier export"):
        check_remote_replaceable(f"{s3_bucket}/other")
    storage.write_bytes(f"{s3_bucket}/hf/config.json", b'{"model_type": "bert"}')  # a config.json, not an export's
    storage.write_bytes(f"{s3_bucket}/hf/pytorch_model.bin", b"w")
    with pytest.raises(ExportError, match=r"hf: holds 2 objects and is not an earlier export \(no config.json of "
                                          r"format 1\)"):
        check_remote_replaceable(f"{s3_bucket}/hf")
    # a URL that is not an export is one request, named as the URL (it used to download everything under it)
    with pytest.raises(ExportError, match=rf"^{s3_bucket}/other: not an export \(no config.json\)$"):
        load_export_url(f"{s3_bucket}/other")
    storage.write_bytes(f"{url}/model.safetensors", b"garbage")
    with pytest.raises(ExportError, match=rf"^{url}/model.safetensors: sha256 does not match"):
        load_export_url(url)


def test_a_damaged_export_config_is_named(tmp_path):
    fam, states = tiny()
    out = write_export(str(tmp_path / "export"), fam, states)
    original = open(os.path.join(out, CONFIG)).read()
    cases = [
        (lambda c: [c], "must be a JSON object, got list"),
        (lambda c: {k: v for k, v in c.items() if k != "files"}, "'files' must map each exported file"),
        (lambda c: {**c, "files": {}}, f"'files' must map each exported file, {WEIGHTS} included"),
        (lambda c: {**c, "files": ["model.safetensors"]}, "'files' must map each exported file"),
        (lambda c: {**c, "files": {**c["files"], "../../etc/hostname": "0" * 64}}, "is not a path inside"),
        (lambda c: {**c, "data_info": [1, 2]}, "'data_info' must be a JSON object, got list"),
        (lambda c: {**c, "format": 2}, "export format 2 was written by a newer dgm"),
        (lambda c: {k: v for k, v in c.items() if k not in ("family", "model")},
         "missing 'family' and 'model': not a config.json dgm export wrote"),
        (lambda c: {**c, "family": "nope"}, r"cannot rebuild the model \(family: unknown family 'nope'"),
    ]
    for change, message in cases:
        edit_config(out, change)
        with pytest.raises(ExportError, match=f"{CONFIG}: .*{message}"):
            load_export(out)
        open(os.path.join(out, CONFIG), "w").write(original)
    with open(os.path.join(out, CONFIG), "wb") as f:
        f.write(b"\xff\xfe not utf-8")
    with pytest.raises(ExportError, match=f"{CONFIG}: not valid JSON"):
        load_export(out)


def test_a_hand_edited_config_is_refused_and_weights_that_do_not_fit_it_are_summarised(tmp_path):
    """config.json was the one file no checksum covered: an edit that kept the tensor shapes (another mode, codec
    quality, image size) loaded and drew other images. The weights file records what they were exported with."""
    fam, states = tiny()
    out = write_export(str(tmp_path / "export"), fam, states)
    for edit in (lambda c: {**c, "model": {**c["model"], "transformer": {**c["model"]["transformer"], "n_head": 4}}},
                 lambda c: {**c, "data_info": {"image_shape": [4, 4, 1]}}):
        original = open(os.path.join(out, CONFIG)).read()
        edit_config(out, edit)
        with pytest.raises(ExportError, match=rf"{CONFIG}: its family, model, data_info or networks were changed "
                                              "after the export"):
            load_export(out)
        open(os.path.join(out, CONFIG), "w").write(original)
    edit_config(out, lambda c: {**c, "model": {**c["model"], "transformer": {**c["model"]["transformer"],
                                                                             "d_model": 32}}})
    # an export written before the record (no metadata): its shapes are still checked, in one line
    weights = os.path.join(out, WEIGHTS)
    flat = {f"model.{k}": v for k, v in states["model"].items()}
    write_safetensors(weights, flat.items(), {k: (v.dtype, tuple(v.shape)) for k, v in flat.items()})
    edit_config(out, lambda c: {**c, "files": {**c["files"], WEIGHTS: hashlib.sha256(open(weights, "rb").read())
                                               .hexdigest()}})
    with pytest.raises(ExportError) as info:
        load_export(out)
    message = str(info.value)
    assert "weights of 'model' do not fit the model built from config.json (size mismatch for" in message
    assert "more)" in message and "\n" not in message and len(message) < 600


def test_sample_labels_are_checked_against_the_models_classes(tmp_path, capsys):
    from launch.cli import main

    fam, states = tiny()  # class-conditional, 10 classes
    out = write_export(str(tmp_path / "igpt"), fam, states)
    png = str(tmp_path / "s.png")
    assert main(["sample", out, "--out", png, "--labels", "3,12"]) == 2
    assert "labels [3, 12]: this image_gpt model has 10 classes (0..9)" in capsys.readouterr().err
    assert not os.path.exists(png)
    assert main(["sample", out, "--out", png, "--labels", "9,0"]) == 0 and os.path.getsize(png) > 100
    plain = ImageGPTFamily(ImageGPTConfig(class_conditional=False,
                                          transformer=TransformerConfig(n_layer=1, n_head=2, d_model=16)), {})
    out = write_export(str(tmp_path / "plain"), plain, {k: m.state_dict() for k, m in plain.build_modules().items()})
    assert main(["sample", out, "--out", png, "--labels", "1"]) == 2
    assert "labels [1]: this image_gpt model is not class-conditional" in capsys.readouterr().err


def test_sample_out_naming_a_folder_and_a_garbled_latest_are_named(tmp_path, capsys):
    from launch.cli import main
    from trainer.checkpoint import CheckpointError, CheckpointStore

    fam, states = tiny()
    out = write_export(str(tmp_path / "igpt"), fam, states)
    assert main(["sample", out, "--out", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a folder; give the PNG file to write" in capsys.readouterr().err
    assert main(["sample", out, "--out", str(tmp_path / "new") + "/"]) == 2
    assert "new/: is a folder; give the PNG file to write" in capsys.readouterr().err
    assert main(["sample", out, "--out", os.path.join(out, "config.json", "s.png"), "--n", "1"]) == 2
    assert f"s.png: cannot write the PNG (File exists: {out}/config.json is a file, not a folder)" in \
        capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp.png")]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_bytes(b"\xff\xfestep")
    with pytest.raises(CheckpointError, match="latest points at .*, which is not a complete checkpoint"):
        CheckpointStore(str(tmp_path / "ckpt")).latest()


def test_export_names_the_checkpoints_there_for_a_wrong_tag(tmp_path):
    from launch.export import export_checkpoint
    from trainer.checkpoint import CheckpointError

    root = tmp_path / "checkpoints"
    (root / "step-00000010").mkdir(parents=True)
    (root / "step-00000020").mkdir()
    with pytest.raises(CheckpointError, match=r"step-00000099: no such checkpoint \(there: step-00000010, "
                                              r"step-00000020\)"):
        export_checkpoint(str(root), str(tmp_path / "out"), "step-00000099")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to export \(is the run's checkpoint_root"):
        export_checkpoint(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to export"):  # leaves no folders it made
        export_checkpoint(str(tmp_path / "empty"), str(tmp_path / "new" / "deeper" / "out"))
    assert not (tmp_path / "new").exists()
    (root / "step-00000030.partial").mkdir()  # a local save cut before its rename
    (root / "step-00000030.partial" / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"step-00000030.partial: an incomplete checkpoint"):
        export_checkpoint(str(root), str(tmp_path / "out"), "step-00000030.partial")
    (root / "step-00000020" / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match="step-00000020/meta.json: unreadable metadata"):  # found, then read
        export_checkpoint(str(root), str(tmp_path / "out"), "step-00000020/")
    meta = {"step": 20, "stream_state": {}, "world_size": 1, "family": "image_gpt", "engines": "model",
            "zero_stage": 2, "config": 5, "data_info": {}}  # hand-edited: a traceback, or networks m, o, d, e, l
    (root / "step-00000020" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"step-00000020/meta.json: unreadable metadata \(wrong type of "
                                              r"engines, config\)"):
        export_checkpoint(str(root), str(tmp_path / "out"), "step-00000020")


def test_sampling_more_than_memory_holds_is_one_line(tmp_path, capsys, monkeypatch):
    """`dgm sample --n 100000000` ended in torch's allocator traceback."""
    from launch.cli import main
    from trainer.families.image_gpt import ImageGPTFamily

    fam, states = tiny()
    out = write_export(str(tmp_path / "igpt"), fam, states)

    def too_many(self, modules, n, gen, **options):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 614800000000 bytes.")

    monkeypatch.setattr(ImageGPTFamily, "sample_images", too_many)
    assert main(["sample", out, "--out", str(tmp_path / "s.png"), "--n", "100000000"]) == 2
    err = capsys.readouterr().err
    assert "--n 100000000: too many samples to draw at once in this machine's memory" in err
    assert "Traceback" not in err and not (tmp_path / "s.png").exists()


def test_python_s_bare_memory_error_and_an_out_url_are_named(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from launch.cli import main
    from trainer.families.image_gpt import ImageGPTFamily

    fam, states = tiny()
    out = write_export(str(tmp_path / "igpt"), fam, states)
    picture = tmp_path / "mine.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(picture)
    assert main(["sample", out, "--images", str(tmp_path / "typo.png"), "--out", str(picture)]) == 2
    assert "No such file" not in capsys.readouterr().err  # the family's own word on --images, not samefile's
    for url in ("s3://bucket/x.png", f"file://{tmp_path}/x.png"):
        assert main(["sample", out, "--out", url]) == 2
        assert f"--out {url}: the grid is written to this machine; give a local .png path" in capsys.readouterr().err

    def bare(self, modules, n, gen, **options):
        raise MemoryError()  # as bytearray or list growth raise it: no message

    monkeypatch.setattr(ImageGPTFamily, "sample_images", bare)
    assert main(["sample", out, "--out", str(tmp_path / "s.png"), "--n", "2"]) == 2
    assert "dgm sample: error: MemoryError: out of this machine's memory" in capsys.readouterr().err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_safetensors_takes_scalars_and_safetensors_reads_what_it_wrote(tmp_path):
    """A 0-dim tensor (a learnable temperature) failed at `view(torch.uint8)` after the whole consolidation."""
    from safetensors.torch import load_file

    from trainer.export import write_safetensors

    tensors = {"scale": torch.tensor(2.5), "w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
               "steps": torch.tensor([3], dtype=torch.int64)}
    write_safetensors(str(tmp_path / "x.safetensors"), tensors.items(),
                      {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) and back[k].shape == v.shape
                                             for k, v in tensors.items())


def test_export_never_names_the_folder_it_stands_in(tmp_path, monkeypatch):
    """An export replaces its folder by renaming it aside: --out . failed after the whole consolidation with
    'Device or resource busy: . -> ..old-...' as a traceback."""
    fam, states = tiny()
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    for out in (".", str(tmp_path / "a"), "./"):
        with pytest.raises(ExportError, match=r"is the current folder or holds it; give --out a folder below it"):
            write_export(out, fam, states)
    assert write_export("export", fam, states) == "export" and load_export("export")


def test_weights_of_an_integer_type_where_the_model_has_floats_are_refused(tmp_path):
    fam, states = tiny()
    states = {"model": {**states["model"], "head.weight": states["model"]["head.weight"].round().long()}}
    out = write_export(str(tmp_path / "export"), fam, states)
    with pytest.raises(ExportError, match=r"tensor model.head.weight is torch.int64, the model's is torch.float32"):
        load_export(out)
