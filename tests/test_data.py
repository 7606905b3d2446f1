"""Image loading, checks, micro-conditioning and buckets of sdxl_ambient.data."""

import json
import logging
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_ambient import data
from sdxl_ambient.data import DataConfig, DataSource, ImageRecord, read_metadata


def source(folder, **overrides) -> DataSource:
    return DataSource(train_data_dir=str(folder), **overrides)


def load(folder, **overrides) -> data.TrainingImages:
    """load_training_images at 64 px; each override goes to DataSource or DataConfig by name."""
    transform = {f.name for f in fields(DataConfig)}
    config = DataConfig(**{"resolution": 64, **{k: v for k, v in overrides.items() if k in transform}})
    return data.load_training_images(source(folder, **{k: v for k, v in overrides.items() if k not in transform}), config)


def record(path: Path, key="x") -> ImageRecord:
    return ImageRecord(key, "a caption", path)


def save(tmp_path, name, im, **kw) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


# ----------------------------------------------------------------------------- image modes


def test_16_bit_gray_ramp_scales_to_8_bit(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(1, 256).repeat(2, axis=0)
    im = data.load_image(record(save(tmp_path, "ramp16.png", Image.fromarray(ramp))))
    arr = np.asarray(im)
    assert im.mode == "RGB" and arr.shape == (2, 256, 3)
    np.testing.assert_array_equal(arr[0, :, 0], np.arange(256))
    assert (arr[..., 0] == arr[..., 2]).all()


def test_transparency_composites_onto_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    out = np.asarray(data.load_image(record(save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])
    assert abs(int(out[0, 2, 0]) - 127) <= 1
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(np.asarray(data.load_image(record(save(tmp_path, "la.png", la))))[0], [[255] * 3, [0] * 3])
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    out = np.asarray(data.load_image(record(save(tmp_path, "p.png", pal, transparency=0))))
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [10, 200, 30]])


def test_gray_palette_and_cmyk_convert(tmp_path):
    gray = np.asarray(data.load_image(record(save(tmp_path, "l.png", Image.new("L", (3, 2), 77)))))
    assert gray.shape == (2, 3, 3) and (gray == 77).all()
    pal = Image.new("P", (1, 1))
    pal.putpalette([9, 99, 199] + [0] * 765)
    np.testing.assert_array_equal(np.asarray(data.load_image(record(save(tmp_path, "p.png", pal))))[0, 0], [9, 99, 199])
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    out = np.asarray(data.load_image(record(save(tmp_path, "c.tif", cmyk))))
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [255, 0, 0]])


# How each EXIF orientation says the stored pixels are to be shown (the EXIF standard), written with numpy.
EXIF_DISPLAY = {
    1: lambda a: a,
    2: np.fliplr,                                    # mirrored left-right
    3: lambda a: np.rot90(a, 2),                     # upside down
    4: np.flipud,                                    # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),               # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),                    # turned a quarter clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),                     # turned a quarter anticlockwise
}


@pytest.mark.parametrize("orientation", sorted(EXIF_DISPLAY))
def test_exif_orientation_is_applied_and_gives_the_original_size(tmp_path, orientation):
    """Every orientation, on distinct pixels stored losslessly: the image read is exactly the one to be shown, and
    its shown (h, w) is the original size SDXL is conditioned on."""
    stored = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path, "oriented.png", Image.fromarray(stored), exif=exif)
    shown = EXIF_DISPLAY[orientation](stored)
    np.testing.assert_array_equal(np.asarray(data.load_image(record(path))), shown)
    (checked,), _ = data.check_images([record(path)])
    assert checked.original_size == shown.shape[:2]


# ----------------------------------------------------------------------------- bad files


def broken_files(folder: Path) -> dict[str, bytes]:
    jpg = (folder / "astronaut.jpg").read_bytes()
    return {"truncated.jpg": jpg[: len(jpg) // 2], "notes.png": b"this is text, not an image", "empty.jpg": b""}


@pytest.mark.parametrize("bad", ["truncated.jpg", "notes.png", "empty.jpg"])
def test_each_broken_file_is_an_error_naming_it(image_folder, bad):
    (image_folder / bad).write_bytes(broken_files(image_folder)[bad])
    rows = read_metadata(image_folder) + [{"file_name": bad, "text": "broken"}]
    (image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=bad):
        load(image_folder)


def test_skip_broken_images_skips_and_reports_each(image_folder, caplog):
    files = broken_files(image_folder)
    for name, content in files.items():
        (image_folder / name).write_bytes(content)
    rows = read_metadata(image_folder) + [{"file_name": n, "text": "broken"} for n in files]
    (image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING, logger="sdxl_ambient.data"):
        images = load(image_folder, skip_broken_images=True)
    assert [r.key for r in images.records] == [r["file_name"] for r in read_metadata(image_folder)[:8]]
    assert sorted(images.skipped) == sorted(files)
    for name in files:
        assert name in caplog.text


def test_empty_captions_are_an_error_naming_the_files_unless_allowed(image_folder):
    rows = read_metadata(image_folder)
    rows[2]["text"] = "  "
    (image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=rows[2]["file_name"]):
        load(image_folder)
    assert len(load(image_folder, allow_empty_captions=True).records) == 8


def test_missing_caption_column_names_the_flag_and_the_columns(image_folder):
    with pytest.raises(ValueError, match=r"--caption_column 'prompt'.*\['file_name', 'text'\]"):
        data.collect_records(source(image_folder, caption_column="prompt"))


def test_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--train_data_dir \S+/empty holds no images"):
        data.collect_records(source(tmp_path / "empty"))


def test_kohya_caption_files_and_max_train_samples(tmp_path):
    folder = tmp_path / "kohya"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.png", "sub/c.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    records = data.collect_records(source(folder))
    assert [(r.key, r.caption) for r in records] == [(n, f"caption of {n}") for n in ("a.png", "b.png", "sub/c.png")]
    assert [r.key for r in data.collect_records(source(folder, max_train_samples=2))] == ["a.png", "b.png"]


def test_saved_hf_dataset_with_row_keys_and_column_errors(tmp_path):
    import datasets

    ims = [Image.new("RGB", (16, 8), (i * 60, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"img": ims, "prompt": ["r0", "r1", "r2"]}).cast_column("img", datasets.Image())
    ds.save_to_disk(tmp_path / "saved")
    saved = DataSource(dataset_name=str(tmp_path / "saved"), image_column="img", caption_column="prompt")
    records, _ = data.check_images(data.collect_records(saved))
    assert [(r.key, r.caption, r.original_size) for r in records] == [(str(i), f"r{i}", (8, 16)) for i in range(3)]
    assert np.asarray(data.load_image(records[2]))[0, 0, 0] == 120
    as_folder = source(tmp_path / "saved", image_column="img", caption_column="prompt", max_train_samples=2)
    assert [r.caption for r in data.collect_records(as_folder)] == ["r0", "r1"]
    with pytest.raises(ValueError, match=r"--image_column 'image'.*\['img', 'prompt'\]"):
        data.collect_records(DataSource(dataset_name=str(tmp_path / "saved"), caption_column="prompt"))


# ----------------------------------------------------------------------------- micro-conditioning


def gradient_image(h=60, w=100) -> Image.Image:
    """Red encodes the column, green the row: a crop shows where it was taken."""
    x = np.tile(np.arange(w, dtype=np.uint8)[None, :], (h, 1))
    y = np.tile(np.arange(h, dtype=np.uint8)[:, None], (1, w))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1))


def example(tmp_path, config, key="img.png", seed=3):
    path = tmp_path / key
    if not path.exists():
        gradient_image().save(path)
    return data.prepare_example(ImageRecord(key, "c", path), config, seed)


def test_center_crop_micro_conditioning_of_a_wide_image(tmp_path):
    ex = example(tmp_path, DataConfig(resolution=48, center_crop=True))
    # 100 x 60 -> shorter side 48: 80 x 48; centre crop leaves (80 - 48) / 2 = 16 columns on the left
    assert ex["time_ids"].tolist() == [60, 100, 0, 16, 48, 48]
    resized = np.asarray(gradient_image().resize((80, 48), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.float32)
    np.testing.assert_allclose(ex["pixel_values"].permute(1, 2, 0).numpy(), resized[:, 16:64] / 127.5 - 1, atol=1e-6)


def test_random_crop_and_flip_are_seeded_by_key_and_match_the_coordinates(tmp_path):
    resized = gradient_image().resize((80, 48), Image.Resampling.BILINEAR, reducing_gap=None)
    config = DataConfig(resolution=48, random_flip=True)
    lefts, flips = set(), set()
    for k in range(16):
        key = f"img{k}.png"
        ex = example(tmp_path, config, key)
        assert ex["time_ids"].tolist() == example(tmp_path, config, key)["time_ids"].tolist()  # same every time
        top, left = (int(v) for v in ex["time_ids"][2:4])
        assert top == 0 and 0 <= left <= 32
        got = ex["pixel_values"].permute(1, 2, 0).numpy()
        plain = np.asarray(resized, dtype=np.float32)[:, left:left + 48] / 127.5 - 1
        flipped = np.asarray(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT), dtype=np.float32)[:, left:left + 48] / 127.5 - 1
        is_flipped = np.allclose(got, flipped, atol=1e-6)
        assert is_flipped or np.allclose(got, plain, atol=1e-6)
        lefts.add(left)
        flips.add(is_flipped)
    assert len(lefts) > 4 and flips == {True, False}
    other_seed = {int(example(tmp_path, DataConfig(resolution=48), f"img{k}.png", seed=4)["time_ids"][3]) for k in range(16)}
    assert other_seed != lefts


def test_center_crop_with_flip_keeps_the_crop_and_mirrors_the_pixels(tmp_path):
    config = DataConfig(resolution=48, center_crop=True, random_flip=True)
    exs = [example(tmp_path, config, f"f{k}.png") for k in range(12)]
    assert all(e["time_ids"].tolist() == [60, 100, 0, 16, 48, 48] for e in exs)
    firsts = {round(float(e["pixel_values"][0, 0, 0]), 4) for e in exs}
    assert len(firsts) == 2  # left edge from column 16 or (mirrored) column 63 of the resized image


def test_buckets_area_steps_and_closest_aspect():
    buckets = data.bucket_resolutions(64, 32, 128, 16)
    assert (64, 64) in buckets
    assert all(h * w <= 64 * 64 and h % 16 == 0 and w % 16 == 0 and 32 <= min(h, w) and max(h, w) <= 128 for h, w in buckets)
    assert (32, 128) in buckets and (128, 32) in buckets
    config = DataConfig(resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    assert config.target_size((60, 100)) == (48, 80)  # ratio 1.67, bucket 80/48 = 1.67
    assert config.target_size((300, 100)) == (96, 32)  # ratio 1/3 exactly
    assert config.target_size((50, 50)) == (64, 64)
    assert DataConfig(resolution=64).target_size((60, 100)) == (64, 64)


def test_bucketed_example_has_bucket_size_and_crop(tmp_path):
    config = DataConfig(resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                        center_crop=True)
    ex = example(tmp_path, config)
    assert tuple(ex["pixel_values"].shape) == (3, 48, 80)
    assert ex["time_ids"].tolist() == [60, 100, 0, 0, 48, 80]


def test_resolution_must_be_a_multiple_of_8():
    with pytest.raises(ValueError, match="--resolution 100"):
        DataConfig(resolution=100)
    with pytest.raises(ValueError, match="--bucket_reso_steps"):
        DataConfig(resolution=64, enable_bucket=True, min_bucket_reso=32, bucket_reso_steps=12)


def test_small_images_are_upscaled_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "small"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "tiny.png")
    (folder / "tiny.txt").write_text("tiny")
    with caplog.at_level(logging.WARNING, logger="sdxl_ambient.data"):
        images = load(folder)
    assert images.upscaled == ["tiny.png"] and str(folder / "tiny.png") in caplog.text
    assert data.prepare_example(images.records[0], images.config, 0)["pixel_values"].shape == (3, 64, 64)


@pytest.mark.parametrize("value, ok", [(0, 0), (250, 250), ("300", 300), (None, None), ("", None),
                                       (-1, None), ("-1", None), (1000, None), (1.5, None), (True, None), ("high", None)])
def test_the_ambient_timestep_column_gives_each_image_its_level(image_folder, value, ok):
    """metadata.jsonl's ambient_timestep: a whole number in [0, 1000) per image (empty: the run's); anything
    else names the file and row, read before any model loads."""
    rows = [json.loads(line) for line in (image_folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["ambient_timestep"] = value
    (image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bad = value not in (None, "") and ok is None
    if bad:
        with pytest.raises(ValueError, match=r"metadata\.jsonl, row 2: ambient_timestep .*(whole number|must be in \[0, 1000\))"):
            load(image_folder)
        return
    images = load(image_folder, ambient_timestep=7)  # the source's level fills the images without their own
    assert images.records[1].ambient_timestep == (7 if ok is None else ok)
    assert {r.ambient_timestep for i, r in enumerate(images.records) if i != 1} == {7}
