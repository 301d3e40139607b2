"""Image loading and Llama 3.2 Vision preprocessing (spec §4.4).

An image of any size becomes up to `max_num_tiles` square tiles of `tile_size` pixels:
1. pick the best-fit canvas of (tiles_h, tiles_w) tiles with tiles_h * tiles_w <= max_num_tiles,
2. resize without distortion (bilinear; small images grow only until one side reaches one tile),
3. pad bottom/right with black, 4. scale to [0, 1] and normalise with the CLIP mean/std,
5. split into tiles row-major. The aspect ratio (tiles_h, tiles_w) tells the encoder which tiles are real.

This follows Meta's `VariableSizeImageTransform` and matches Hugging Face's `MllamaImageProcessor`
pixel for pixel, with one deliberate choice: like Meta's ChatFormat we `convert("RGB")`, which drops
an alpha channel (Hugging Face composites transparent pixels onto white instead; spec §9 item 7).
EXIF orientation is applied when an image is loaded, so a phone photo is seen the right way up.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# Anything above this is refused rather than decoded: 100 megapixels is ~10x a 12 MP phone photo.
MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """An input that is not a usable image; the message names the source and what is wrong."""


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        return f"data URL ({len(text)} chars)" if text.startswith("data:") else f"file {text!r}"
    if isinstance(source, (bytes, bytearray)):
        return f"{len(source)} bytes of image data"
    return type(source).__name__


def load_image(source) -> Image.Image:
    """A PIL image (RGB, EXIF-rotated, fully decoded) from a path, bytes, a PIL image or a data URL.

    Also accepted: OpenAI-style content items `{"type": "image_url", "image_url": {"url": ...}}`,
    `{"type": "image", "image": ...}` and `{"url": ...}`.
    """
    if isinstance(source, dict):
        inner = source.get("image_url", source.get("image", source.get("url")))
        if isinstance(inner, dict):
            inner = inner.get("url")
        if inner is None:
            raise ImageError(f"image content item has no image: keys {sorted(source)}")
        return load_image(inner)
    what = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            text = str(source)
            if text.startswith("data:"):
                head, sep, payload = text.partition(",")
                if not sep or ";base64" not in head:
                    raise ImageError(f"{what}: expected 'data:image/...;base64,<data>'")
                try:
                    data = base64.b64decode(payload, validate=True)
                except (binascii.Error, ValueError) as e:
                    raise ImageError(f"{what}: invalid base64 payload ({e})") from None
            elif text.startswith(("http://", "https://")):
                raise ImageError(f"{what}: remote image URLs are not fetched; pass a local path or a data URL")
            else:
                path = Path(text).expanduser()
                if not path.is_file():
                    raise ImageError(f"{what}: no such file")
                data = path.read_bytes()
        else:
            raise ImageError(f"cannot read an image from a {what}")
        if not data:
            raise ImageError(f"{what}: empty (0 bytes)")
        try:
            with warnings.catch_warnings():  # our own MAX_PIXELS check below decides
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(f"{what}: not an image (unrecognised format)") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"{what}: image too large ({e})") from None
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{what}: zero-size image ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageError(f"{what}: image too large ({w}x{h} = {w * h} pixels; the limit is {MAX_PIXELS})")
    try:
        image.load()  # decode now: a truncated file fails here, not halfway through the model
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{what}: cannot decode image ({e})") from None
    return image.convert("RGB") if image.mode != "RGB" else image


def supported_aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """(tiles_h, tiles_w) with h * w <= max_num_tiles, in Hugging Face's id order: (1,1),(1,2),..,(4,1)."""
    return [(h, w) for h in range(1, max_num_tiles + 1) for w in range(1, max_num_tiles + 1) if h * w <= max_num_tiles]


def best_fit_canvas(width: int, height: int, tile_size: int, max_num_tiles: int) -> tuple[int, int]:
    """(tiles_h, tiles_w) of the canvas that needs the least scaling (Meta `get_best_fit`)."""
    ratios = supported_aspect_ratios(max_num_tiles)
    # Scale that fits the image into each canvas without distortion (the limiting side decides).
    scales = [min(h * tile_size / height, w * tile_size / width) for h, w in ratios]
    ups = [s for s in scales if s >= 1]
    chosen = min(ups) if ups else max(scales)  # smallest upscale, else the least downscale
    candidates = [r for r, s in zip(ratios, scales) if s == chosen]
    return min(candidates, key=lambda r: r[0] * r[1])  # least padding; first on ties


def resized_size(width: int, height: int, canvas_w: int, canvas_h: int, tile_size: int) -> tuple[int, int]:
    """(new_w, new_h): fit into the canvas, upscaling only until a side reaches one tile."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, min(int(height * scale_w) or 1, target_h)
    return min(int(width * scale_h) or 1, target_w), target_h


def image_to_tiles(image: Image.Image, tile_size: int = 560, max_num_tiles: int = 4) -> tuple[Tensor, tuple[int, int]]:
    """One RGB image -> (tiles (n, 3, tile, tile) float32 normalised, (tiles_h, tiles_w))."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    nh, nw = best_fit_canvas(w, h, tile_size, max_num_tiles)
    canvas_w, canvas_h = nw * tile_size, nh * tile_size
    new_w, new_h = resized_size(w, h, canvas_w, canvas_h, tile_size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    pixels = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)  # black padding bottom/right
    pixels[:new_h, :new_w] = np.asarray(image)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    # (3, nh*T, nw*T) -> (nh*nw, 3, T, T), tiles in row-major order
    x = x.view(3, nh, tile_size, nw, tile_size).permute(1, 3, 0, 2, 4).reshape(nh * nw, 3, tile_size, tile_size)
    return x.contiguous(), (nh, nw)



@dataclass
class ImageBatch:
    """Preprocessed images of a batch of prompts, padded to the same image and tile count.

    pixel_values (B, N_img, max_tiles, 3, T, T): padding tiles and padding images are zeros.
    aspect_ratios (B, N_img, 2): (tiles_h, tiles_w); padding images get (1, 1) as Meta does.
    num_images (B,): real images per prompt.
    """

    pixel_values: Tensor
    aspect_ratios: Tensor
    num_images: list[int]

    @property
    def max_num_tiles(self) -> int:
        return self.pixel_values.shape[2]

    @property
    def aspect_ratio_ids(self) -> Tensor:
        """Hugging Face's (B, N_img) ids: index in supported_aspect_ratios + 1; 0 for padding images."""
        ratios = supported_aspect_ratios(self.max_num_tiles)
        ids = torch.zeros(self.aspect_ratios.shape[:2], dtype=torch.long)
        for b, n in enumerate(self.num_images):
            for i in range(n):
                ids[b, i] = ratios.index(tuple(self.aspect_ratios[b, i].tolist())) + 1
        return ids

    @property
    def aspect_ratio_mask(self) -> Tensor:
        """Hugging Face's (B, N_img, max_tiles) valid-tile mask (tile 0 always 1)."""
        n_tiles = self.aspect_ratios.prod(-1)  # (B, N)
        mask = (torch.arange(self.max_num_tiles)[None, None] < n_tiles[..., None]).long()
        mask[..., 0] = 1
        return mask


def preprocess_images(images, tile_size: int = 560, max_num_tiles: int = 4) -> ImageBatch:
    """Images of one prompt (a list) or of a batch (a list of lists) -> ImageBatch.

    Each image may be anything `load_image` accepts.
    """
    if not images or not isinstance(images[0], (list, tuple)):
        images = [images]  # one prompt (possibly without images)
    rows = [[image_to_tiles(load_image(im), tile_size, max_num_tiles) for im in row] for row in images]
    n_max = max((len(r) for r in rows), default=0)
    pixels = torch.zeros(len(rows), n_max, max_num_tiles, 3, tile_size, tile_size)
    ratios = torch.ones(len(rows), n_max, 2, dtype=torch.long)
    for b, row in enumerate(rows):
        for i, (tiles, ar) in enumerate(row):
            pixels[b, i, : tiles.shape[0]] = tiles
            ratios[b, i] = torch.tensor(ar)
    return ImageBatch(pixels, ratios, [len(r) for r in rows])
