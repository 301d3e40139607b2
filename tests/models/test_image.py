"""Image preprocessing parity with transformers' MllamaImageProcessor (CLIP mean/std, 560 px, 4 tiles),
image sources, modes, EXIF rotation and bad inputs."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from corral.models.image import MEAN, STD, ImageError, best_fit_canvas, load_image, preprocess_images

RESOURCES = Path(__import__("llama_models").__file__).parent / "resources"


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    return MllamaImageProcessor(size={"height": 560, "width": 560}, max_image_tiles=4,
                                image_mean=list(MEAN), image_std=list(STD))


def assert_matches_hf(ours, hf_processor, hf_images):
    ref = hf_processor(images=[hf_images], return_tensors="pt")
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    diff = (ours.pixel_values - ref["pixel_values"]).abs().max().item()
    assert diff < 1e-6, diff
    assert torch.equal(ours.aspect_ratio_ids, ref["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, ref["aspect_ratio_mask"])


def noise(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def test_real_photos_match_hf(hf_processor):
    paths = [RESOURCES / "dog.jpg", RESOURCES / "pasta.jpeg"]
    ours = preprocess_images([str(p) for p in paths])  # two images in one prompt
    assert_matches_hf(ours, hf_processor, [Image.open(p) for p in paths])
    assert ours.num_images == [2]


# (w, h) -> (tiles_h, tiles_w), from spec §4.4 plus extremes and tiny images.
SIZES = {(800, 600): (2, 2), (300, 800): (2, 1), (1000, 200): (1, 2), (100, 100): (1, 1), (2000, 1500): (2, 2),
         (1200, 300): (1, 3), (4000, 100): (1, 4), (100, 4000): (4, 1), (10, 10): (1, 1), (1, 1): (1, 1),
         (561, 560): (1, 2), (559, 1121): (3, 1), (3000, 7): (1, 4)}


@pytest.mark.parametrize("size", list(SIZES))
def test_sizes_match_hf(hf_processor, size):
    image = noise(*size, seed=size[0])
    ours = preprocess_images([image])
    assert tuple(ours.aspect_ratios[0, 0].tolist()) == SIZES[size]
    assert_matches_hf(ours, hf_processor, [image])


def test_canvas_rules():
    assert best_fit_canvas(800, 600, 560, 4) == (2, 2)  # smallest upscale >= 1
    assert best_fit_canvas(2000, 1500, 560, 4) == (2, 2)  # least downscale
    assert best_fit_canvas(100, 100, 560, 4) == (1, 1)  # ties: least area


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK", "I;16"])
def test_modes(hf_processor, mode):
    """Every mode is read as Meta does (`convert("RGB")`, alpha dropped); HF agrees on that RGB image,
    and on the original wherever alpha is opaque (HF composites transparent pixels onto white)."""
    base = noise(300, 200, "RGBA" if "A" in mode else "RGB", seed=7)
    image = base.convert(mode) if mode not in ("LA",) else noise(300, 200, "LA", seed=7)
    ours = preprocess_images([image])
    assert_matches_hf(ours, hf_processor, [image.convert("RGB")])
    if mode in ("L", "P", "1", "CMYK"):
        assert_matches_hf(ours, hf_processor, [image])


def test_rgba_drops_alpha_like_meta(hf_processor):
    opaque = noise(200, 100, "RGBA", seed=3)
    opaque.putalpha(255)
    assert_matches_hf(preprocess_images([opaque]), hf_processor, [opaque])
    see_through = noise(200, 100, "RGBA", seed=3)
    ours = preprocess_images([see_through])
    ref = hf_processor(images=[[see_through]], return_tensors="pt")["pixel_values"]
    assert (ours.pixel_values - ref).abs().max() > 0.1  # the documented Meta/HF difference (spec §9.7)


def test_sources_give_the_same_pixels(tmp_path):
    image = noise(120, 90, seed=4)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    data = buf.getvalue()
    path = tmp_path / "x.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    sources = [image, str(path), path, data, url, {"type": "image_url", "image_url": {"url": url}},
               {"type": "image", "image": str(path)}]
    batches = [preprocess_images([s]) for s in sources]
    for b in batches[1:]:
        assert torch.equal(b.pixel_values, batches[0].pixel_values)


def test_exif_rotation_is_applied():
    image = noise(200, 100, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    image.save(buf, "PNG", exif=exif)
    loaded = load_image(buf.getvalue())
    assert loaded.size == (100, 200)
    assert np.array_equal(np.asarray(loaded), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))


def test_batch_padding():
    batch = preprocess_images([[noise(800, 600)], [noise(20, 20), noise(1000, 200)]])
    assert batch.pixel_values.shape == (2, 2, 4, 3, 560, 560)
    assert batch.num_images == [1, 2]
    assert batch.aspect_ratio_ids.tolist() == [[6, 0], [1, 2]]
    assert batch.aspect_ratio_mask.tolist() == [[[1, 1, 1, 1], [1, 0, 0, 0]], [[1, 0, 0, 0], [1, 1, 0, 0]]]
    assert batch.pixel_values[0, 1].abs().sum() == 0  # the padding image


def _png_with_size(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", w, h)  # IHDR width/height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bad_images_are_clear_errors(tmp_path):
    buf = io.BytesIO()
    noise(300, 300).save(buf, "JPEG")
    jpeg = buf.getvalue()
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(jpeg[: len(jpeg) // 2])  # truncated
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"this is plain text, not a picture")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="zero-size"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError, match="too large"):
        load_image(_png_with_size(20000, 6000))
    with pytest.raises(ImageError, match="no such file"):
        load_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(ImageError, match="base64"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="remote"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageError, match="no image"):
        load_image({"type": "image_url"})
    with pytest.raises(ImageError, match="cannot read"):
        load_image(42)
