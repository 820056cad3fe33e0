"""Reference fixtures for the image processor (src/image/, MODEL_SPEC.md section 4).

How it was run (from the repository root, CPU only, about a minute):

    tools/.venv/bin/python tools/fixtures_images.py

with the reference environment of tools/requirements.txt (transformers 5.17.0, torch 2.11.0, torchvision 0.26.0,
pillow 13.0.0 bundling libjpeg-turbo 3.2.0 and libwebp 1.6.0). It writes tests/fixtures/images/, which is committed;
the Rust tests never run Python. Re-running is deterministic (fixed seeds, fixed encoder settings), except the
timing field in fixtures.json.

Inputs:
  * real photos: JPEGs from ../shared/data/faces/ (see tests/fixtures/images/ATTRIBUTION.md), copied byte-identical
    into tests/fixtures/images/. When ../shared is absent the copies already in the fixture folder are used.
  * generated images: deterministic (numpy seed) gradients, shapes and a patch of noise, encoded with PIL in the
    formats and corner cases the decoder must handle (EXIF orientation 3/6/8, progressive and 4:2:2/4:4:4 JPEG,
    restart markers, odd sizes, grayscale JPEG, L / RGBA / palette / 16-bit PNG, lossy and lossless WebP, BMP, GIF,
    extreme aspect ratios, a tiny 5x7 image, a large 2048x1536 JPEG and the 1024x1024 JPEG the bench uses).

Reference path: `transformers.image_utils.load_image` (PIL open, ImageOps.exif_transpose, convert("RGB")), then
`GotOcr2ImageProcessor` built with the InternVL3-hf preprocessor_config values (MODEL_SPEC section 4) and called with
crop_to_patches=True, which is what InternVLProcessor passes through its `_defaults` (asserted below). In transformers
5.17 the processor's own loader for *path strings* (`fetch_images` -> torchvision `decode_image`) skips EXIF
orientation; the PIL path recorded here is the one of transformers 4.52 (used by FaceLLM) and of any caller that
passes PIL images, and the one the Rust side reproduces.

For each image fixtures.json records the grid (cols, rows), num_tiles, shape, per-channel mean and population std
(float64 over all tiles), the first 8 values of every tile (channel 0, row 0), and the name of a gzip file holding
every pixel value as a uint8 level: level = round(x * 255*std_c + 255*mean_c), checked here to reconstruct every
float32 value within 1e-3 (so the levels are lossless), and more: (level - mean32) / std32 in float32 gives the
reference's pixel_values back bit for bit. Level files are stored tile-major [tiles, 3, 448, 448] as
residuals of the JPEG-LS median edge predictor inside each 448x448 plane (see med_filter) before gzip, which keeps
the folder under 8 MB; the Rust test undoes it.

It also records the reference time of load + preprocess of gen_1024.jpg (median of 15 runs after 3 warm-ups,
torch threads = 2) for the criterion bench comparison.

A second mode writes a larger, uncommitted set of random small inputs for tests/image_stress.rs (see `stress`):

    tools/.venv/bin/python tools/fixtures_images.py --stress /tmp/stress 1500
"""

import gzip
import hashlib
import io
import json
import platform
import shutil
import statistics
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import PIL
import PIL.features
import torch
import torchvision
import transformers
from PIL import Image
from transformers.image_utils import load_image
from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor, get_optimal_tiled_canvas
from transformers.models.internvl.processing_internvl import InternVLProcessorKwargs

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "images"
SHARED_FACES = ROOT.parent / "shared" / "data" / "faces"

TILE = 448
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

# Real photos used by the tests: every single-tile face crop plus one multi-tile photo (two people, grid 3x2).
# The 13-tile ones (obama_portrait 410x512, obama_small 320x240) are left out to keep the folder small.
FACES = [
    "fairface_repo_race_Asian_face0.jpg",
    "fairface_repo_race_Black_face0.jpg",
    "fairface_repo_race_Latino_face0.jpg",
    "fairface_repo_race_Middle_Eastern_face0.jpg",
    "fairface_repo_race_White_face0.jpg",
    "pd_astronaut_eileen_collins.jpg",
    "pd_biden_portrait.jpg",
    "pd_obama_biden_two_people.jpg",
]


def build_processor():
    assert InternVLProcessorKwargs._defaults["images_kwargs"]["crop_to_patches"] is True
    return GotOcr2ImageProcessor(
        size={"height": TILE, "width": TILE},
        resample=3,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=MEAN,
        image_std=STD,
        do_convert_rgb=True,
        crop_to_patches=False,
        min_patches=1,
        max_patches=12,
    )


# ---------------------------------------------------------------------------------------------------------------
# Generated images


def pattern(w, h, seed):
    """RGB uint8 [h, w, 3]: smooth gradients, a few flat shapes, one noisy patch, and an asymmetric marker in the
    top-left corner so a wrong orientation or flip cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / max(w - 1, 1), y / max(h - 1, 1)
    r = 40 + 180 * u
    g = 30 + 190 * v
    b = 128 + 100 * np.sin(2 * np.pi * (u + 0.5 * v))
    img = np.stack([r, g, b], axis=-1)
    s = min(w, h)
    for _ in range(4):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rad = rng.uniform(0.08, 0.25) * s
        color = rng.uniform(0, 255, size=3)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < rad**2
        img[mask] = color
    for _ in range(3):
        x0, y0 = int(rng.uniform(0, w * 0.8)), int(rng.uniform(0, h * 0.8))
        x1, y1 = x0 + max(1, int(rng.uniform(0.05, 0.2) * w)), y0 + max(1, int(rng.uniform(0.05, 0.2) * h))
        img[y0:y1, x0:x1] = rng.uniform(0, 255, size=3)
    # noisy patch: what real photos have and gradients lack (exercises rounding everywhere)
    nx0, ny0, nw, nh = int(0.55 * w), int(0.55 * h), max(1, int(0.12 * w)), max(1, int(0.12 * h))
    img[ny0 : ny0 + nh, nx0 : nx0 + nw] += rng.normal(0, 25, size=(min(nh, h - ny0), min(nw, w - nx0), 3))
    # marker: a bright bar along the top-left, longer horizontally than vertically
    mw, mh = max(1, w // 4), max(1, h // 10)
    img[:mh, :mw] = [255, 0, 0]
    img[:max(1, h // 6), : max(1, w // 12)] = [0, 0, 255]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def exif_bytes(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def save(img, name, **kw):
    path = OUT / name
    img.save(path, **kw)
    return path


def png_16bit(path, color_type, px):
    """PIL cannot write 16-bit RGB(A) or gray+alpha PNG, so write the chunks directly."""

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    h, w = px.shape[:2]
    raw = b"".join(b"\x00" + px[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def generate():
    """Returns [(file name, description)] of the generated images, written into OUT."""
    out = []

    def add(name, desc):
        out.append((name, desc))

    # Near-square sizes keep these at one tile: only the decoder path differs between them.
    base = Image.fromarray(pattern(232, 216, 1))
    for o, kw, desc in [
        (3, dict(quality=90, progressive=True), "EXIF orientation 3 (rotate 180), progressive 4:2:0"),
        (6, dict(quality=90, subsampling=1), "EXIF orientation 6 (rotate 270 = 90 clockwise), baseline 4:2:2"),
        (8, dict(quality=92, subsampling=0, progressive=True), "EXIF orientation 8 (rotate 90), progressive 4:4:4"),
    ]:
        name = f"gen_exif_rot{o}.jpg"
        save(base, name, exif=exif_bytes(o), **kw)
        add(name, f"232x216 stored; {desc}")

    odd = Image.fromarray(pattern(233, 217, 2))
    save(odd, "gen_odd_restart.jpg", quality=85, restart_marker_blocks=3)
    add("gen_odd_restart.jpg", "233x217 (partial MCUs), baseline 4:2:0, restart interval 3 MCUs")
    save(odd, "gen_odd_progressive_restart.jpg", quality=75, progressive=True, restart_marker_rows=1)
    add("gen_odd_progressive_restart.jpg", "233x217, progressive 4:2:0 with a restart marker every MCU row")

    gray = Image.fromarray(pattern(220, 228, 3)).convert("L")
    save(gray, "gen_gray.jpg", quality=90)
    add("gen_gray.jpg", "grayscale (1-component) JPEG 220x228")
    save(gray, "gen_gray.png")
    add("gen_gray.png", "mode L PNG 220x228 (replicated to RGB)")

    rgba = pattern(224, 230, 4)
    alpha = (np.add.outer(np.arange(230), np.arange(224)) * 255 // (230 + 224 - 2)).astype(np.uint8)
    alpha[:40, :40] = 0  # fully transparent corner: alpha is dropped, not composited
    save(Image.fromarray(np.dstack([rgba, alpha]), "RGBA"), "gen_rgba.png")
    add("gen_rgba.png", "RGBA PNG 224x230 with varying alpha and a fully transparent corner (alpha dropped)")

    pal = Image.fromarray(pattern(226, 222, 5)).quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    save(pal, "gen_palette.png", transparency=0)
    add("gen_palette.png", "palette (P) PNG 226x222, 64 colours, tRNS on index 0 (ignored by convert RGB)")

    px16 = pattern(218, 226, 6).astype(np.uint16) * 257 + np.random.default_rng(6).integers(0, 257, size=(226, 218, 3)).astype(np.uint16)
    png_16bit(OUT / "gen_rgb16.png", 2, px16)
    add("gen_rgb16.png", "16-bit RGB PNG 218x226 (PIL keeps the high byte)")

    webp = Image.fromarray(pattern(230, 220, 7))
    save(webp, "gen_lossless.webp", lossless=True)
    add("gen_lossless.webp", "lossless WebP 230x220")
    save(webp, "gen_lossy.webp", quality=90)
    add("gen_lossy.webp", "lossy WebP 230x220 quality 90")

    save(Image.fromarray(pattern(221, 219, 8)), "gen.bmp")
    add("gen.bmp", "24-bit BMP 221x219 (bottom-up rows)")

    frames = [Image.fromarray(pattern(216, 224, 9 + i)).quantize(colors=128, dither=Image.Dither.NONE) for i in range(2)]
    frames[0].save(OUT / "gen_anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("gen_anim.gif", "2-frame GIF 216x224, no transparency (first frame used)")

    save(Image.fromarray(pattern(2000, 60, 10)), "gen_wide_2000x60.png", optimize=True)
    add("gen_wide_2000x60.png", "extreme aspect ratio 2000x60 (grid 12x1)")
    save(Image.fromarray(pattern(60, 2000, 11)), "gen_tall_60x2000.png", optimize=True)
    add("gen_tall_60x2000.png", "extreme aspect ratio 60x2000 (grid 1x12)")
    save(Image.fromarray(pattern(5, 7, 12)), "gen_tiny_5x7.png")
    add("gen_tiny_5x7.png", "tiny 5x7 PNG (grid 3x4, heavy upscaling)")

    save(Image.fromarray(pattern(2048, 1536, 13)), "gen_large_2048x1536.jpg", quality=85)
    add("gen_large_2048x1536.jpg", "large 2048x1536 baseline 4:2:0 JPEG (grid 4x3, downscaling)")
    save(Image.fromarray(pattern(1024, 1024, 14)), "gen_1024.jpg", quality=90)
    add("gen_1024.jpg", "1024x1024 baseline 4:2:0 JPEG (grid 3x3 + thumbnail); the bench input")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reference


def med_filter(levels):
    """levels: uint8 [tiles, 3, 448, 448] -> residuals mod 256 of the JPEG-LS median edge predictor, applied inside
    each 448x448 plane with zeros outside it: pred = min(a, b) if c >= max(a, b), max(a, b) if c <= min(a, b),
    a + b - c otherwise, where a = left, b = up, c = up-left. About 16% smaller than plain left differences."""
    lv = levels.reshape(-1, TILE, TILE).astype(np.int16)
    a = np.zeros_like(lv)
    a[:, :, 1:] = lv[:, :, :-1]
    b = np.zeros_like(lv)
    b[:, 1:, :] = lv[:, :-1, :]
    c = np.zeros_like(lv)
    c[:, 1:, 1:] = lv[:, :-1, :-1]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pred = np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))
    return ((lv - pred) % 256).astype(np.uint8)


def to_levels(pv):
    """pv: float32 [tiles, 3, 448, 448] -> uint8 levels, asserting the mapping is lossless."""
    mean = np.array(MEAN, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.array(STD, dtype=np.float64).reshape(1, 3, 1, 1)
    x = pv.astype(np.float64)
    lv = np.rint(x * 255 * std + 255 * mean)
    assert lv.min() >= 0 and lv.max() <= 255, (lv.min(), lv.max())
    back = (lv - 255 * mean) / (255 * std)
    err = np.abs(back - x).max()
    assert err < 1e-3, err
    # Stronger: the reference's own f32 arithmetic on the levels gives back its output bit for bit, so a
    # consumer that matches the levels and does (level - mean32) / std32 in f32 matches pixel_values exactly.
    mean32 = torch.tensor(MEAN) * (1.0 / (1 / 255))
    std32 = torch.tensor(STD) * (1.0 / (1 / 255))
    again = (torch.from_numpy(lv.astype(np.float32)) - mean32.view(1, 3, 1, 1)) / std32.view(1, 3, 1, 1)
    assert torch.equal(again, torch.from_numpy(pv)), "levels do not reproduce pixel_values bit for bit"
    return lv.astype(np.uint8), float(err)


def reference(proc, path):
    img = load_image(str(path))
    out = proc(images=[img], crop_to_patches=True, return_tensors="pt")
    pv = out["pixel_values"].numpy()
    assert pv.dtype == np.float32 and pv.shape[1:] == (3, TILE, TILE), pv.shape
    num_patches = int(out["num_patches"][0])
    assert num_patches == pv.shape[0]
    grid = get_optimal_tiled_canvas((img.height, img.width), (TILE, TILE), 1, 12)
    cols, rows = grid
    assert num_patches == cols * rows + (1 if cols * rows != 1 else 0)
    return img, pv, (cols, rows)


def time_reference(proc, path, runs=15, warmup=3):
    torch.set_num_threads(2)
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        img = load_image(str(path))
        proc(images=[img], crop_to_patches=True, return_tensors="pt")
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return statistics.median(times), times


def stress(out_dir, count):
    """Many small random inputs (not committed): JPEG with every sampling/progressive/restart/quality mix, odd
    sizes from 1 pixel up, all 8 EXIF orientations, and PNG/BMP/GIF/WebP modes the fixtures do not cover, after
    a few fixed corner cases (animations, PNG/WebP/XMP orientation, 16-bit with alpha, CMYK).
    Records HF's output with tiling off (one squashed tile: exercises every size of the resize) as levels in
    the same format as the fixtures, plus the tiled grid. Checked by `tests/image_stress.rs` (ignored test):

        tools/.venv/bin/python tools/fixtures_images.py --stress /tmp/stress 300
        FACELLM_IMAGE_STRESS=/tmp/stress cargo test --release --test image_stress -- --ignored --nocapture
    """
    import random

    out_dir = Path(out_dir)
    (out_dir / "levels").mkdir(parents=True, exist_ok=True)
    proc = build_processor()
    rnd = random.Random(1234)
    records = []

    def record(name, desc, tiled=False):
        try:
            img = load_image(str(out_dir / name))
        except Exception as e:  # noqa: BLE001 - record what PIL refuses
            records.append({"name": name, "description": desc, "error": str(e)})
            return
        rec = {"name": name, "description": desc, "width": img.width, "height": img.height}
        for key, crop in [("levels", False)] + ([("tiled_levels", True)] if tiled else []):
            out = proc(images=[img], crop_to_patches=crop, return_tensors="pt")
            levels, _ = to_levels(out["pixel_values"].numpy())
            lv_name = f"levels/{name}.{key}.u8med.gz"
            (out_dir / lv_name).write_bytes(gzip.compress(med_filter(levels).tobytes(), compresslevel=6, mtime=0))
            rec[key] = lv_name
        rec["grid"] = list(get_optimal_tiled_canvas((img.height, img.width), (TILE, TILE), 1, 12))
        records.append(rec)

    # Fixed corner cases first: animation, metadata orientation outside JPEG EXIF, 16-bit with alpha, CMYK (the
    # `image` crate fallback: expected within 2 levels, not exact).
    frames = [Image.fromarray(pattern(120, 110, 50 + k)) for k in range(3)]
    frames[0].save(out_dir / "x_anim.webp", save_all=True, append_images=frames[1:], duration=50, quality=80)
    record("x_anim.webp", "animated lossy WebP, first frame")
    g = [Image.fromarray(pattern(100, 90, 60 + k)).quantize(colors=32) for k in range(2)]
    g[0].save(out_dir / "x_anim.gif", save_all=True, append_images=g[1:], duration=50, transparency=5, disposal=2)
    record("x_anim.gif", "animated GIF with transparency and disposal 2, first frame")
    Image.fromarray(pattern(130, 120, 70)).convert("CMYK").save(out_dir / "x_cmyk.jpg", quality=90)
    record("x_cmyk.jpg", "CMYK JPEG (Adobe), image crate fallback")
    Image.fromarray(pattern(140, 120, 80)).save(out_dir / "x_exif6.png", exif=exif_bytes(6))
    record("x_exif6.png", "PNG with eXIf orientation 6")
    Image.fromarray(pattern(140, 120, 81)).save(out_dir / "x_exif8.webp", exif=exif_bytes(8), quality=90)
    record("x_exif8.webp", "WebP with EXIF orientation 8")
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="3"/></rdf:RDF></x:xmpmeta>')
    Image.fromarray(pattern(140, 120, 82)).save(out_dir / "x_xmp3.jpg", xmp=xmp, quality=90)
    record("x_xmp3.jpg", "JPEG with orientation 3 in XMP only")
    px16 = pattern(90, 80, 83).astype(np.uint16) * 257
    alpha16 = np.full((80, 90, 1), 40000, dtype=np.uint16)
    png_16bit(out_dir / "x_rgba16.png", 6, np.concatenate([px16, alpha16], axis=2))
    record("x_rgba16.png", "16-bit RGBA PNG")
    png_16bit(out_dir / "x_la16.png", 4, np.concatenate([px16[:, :, :1], alpha16], axis=2))
    record("x_la16.png", "16-bit gray+alpha PNG")
    # Widths and heights equal to a canvas side skip a resize pass; also checked tiled.
    for (w, h, o) in [(448, 448, 1), (896, 448, 1), (448, 300, 1), (300, 448, 6), (1344, 448, 1), (448, 1344, 8)]:
        name = f"x_{w}x{h}_o{o}.png"
        Image.fromarray(pattern(w, h, 90 + w + h)).save(out_dir / name, exif=exif_bytes(o))
        record(name, f"{w}x{h} PNG, orientation {o}: canvas sides equal to the image's", tiled=True)

    for i in range(count):
        w = rnd.choice([1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65]) if rnd.random() < 0.3 else rnd.randint(1, 400)
        h = rnd.choice([1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65]) if rnd.random() < 0.3 else rnd.randint(1, 400)
        px = pattern(w, h, 1000 + i)
        kind = rnd.choice(["jpeg"] * 6 + ["jpeg_gray", "png", "bmp", "gif", "webp"])
        desc = kind
        if kind.startswith("jpeg"):
            im = Image.fromarray(px)
            if kind == "jpeg_gray":
                im = im.convert("L")
            kw = dict(quality=rnd.choice([30, 50, 75, 90, 95, 100]))
            if kind == "jpeg":
                kw["subsampling"] = rnd.choice([0, 1, 2])
            if rnd.random() < 0.4:
                kw["progressive"] = True
            if rnd.random() < 0.3:
                kw["restart_marker_blocks"] = rnd.randint(1, 5)
            if rnd.random() < 0.3:
                kw["exif"] = exif_bytes(rnd.randint(1, 8))
            if rnd.random() < 0.2:
                kw["optimize"] = True
            name = f"s{i:04d}.jpg"
            im.save(out_dir / name, **kw)
            desc += " " + " ".join(f"{k}={v if k != 'exif' else 'orientation'}" for k, v in kw.items())
        elif kind == "png":
            mode = rnd.choice(["1", "L", "LA", "P", "RGB", "RGBA", "PA?"])
            im = Image.fromarray(px)
            if mode == "P":
                im = im.quantize(colors=rnd.choice([2, 4, 16, 200]))
            elif mode == "PA?":
                im = im.quantize(colors=16)
                im.info["transparency"] = 3
                mode = "P+tRNS"
            elif mode == "LA":
                im = im.convert("LA")
            elif mode == "RGBA":
                im = im.convert("RGBA")
                im.putalpha(Image.fromarray(px[:, :, 0]))
            else:
                im = im.convert(mode)
            name = f"s{i:04d}.png"
            kw = {"transparency": 3} if mode == "P+tRNS" else {}
            if rnd.random() < 0.3:
                kw["exif"] = exif_bytes(rnd.randint(1, 8))
            im.save(out_dir / name, **kw)
            desc += f" mode {mode}"
        elif kind == "bmp":
            mode = rnd.choice(["1", "L", "P", "RGB", "RGBA"])
            im = Image.fromarray(px)
            im = im.quantize(colors=16) if mode == "P" else im.convert(mode)
            name = f"s{i:04d}.bmp"
            im.save(out_dir / name)
            desc += f" mode {mode}"
        elif kind == "gif":
            im = Image.fromarray(px).quantize(colors=rnd.choice([2, 16, 256]))
            name = f"s{i:04d}.gif"
            if rnd.random() < 0.5:
                im.save(out_dir / name, transparency=0)
                desc += " transparency=0"
            else:
                im.save(out_dir / name)
        else:
            im = Image.fromarray(px)
            if rnd.random() < 0.3:
                im = im.convert("RGBA")
            name = f"s{i:04d}.webp"
            lossless = rnd.random() < 0.3
            im.save(out_dir / name, lossless=lossless, quality=rnd.choice([50, 80, 95]))
            desc += f" {im.mode} lossless={lossless}"
        record(name, desc)
    (out_dir / "stress.json").write_text(json.dumps({"images": records}, indent=1) + "\n")
    print(f"{len(records)} stress inputs in {out_dir}")


def main():
    import sys

    if len(sys.argv) >= 3 and sys.argv[1] == "--stress":
        stress(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 300)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "levels").mkdir(exist_ok=True)
    torch.manual_seed(0)
    proc = build_processor()

    images = []
    for name in FACES:
        src = SHARED_FACES / name
        dst = OUT / name
        if src.exists():
            shutil.copyfile(src, dst)
        assert dst.exists(), f"missing {dst} and no ../shared copy"
        images.append((name, "real photo from shared/data/faces (see ATTRIBUTION.md)", "real"))
    for name, desc in generate():
        images.append((name, desc, "generated"))

    records = []
    total_level_bytes = 0
    for name, desc, origin in images:
        path = OUT / name
        img, pv, (cols, rows) = reference(proc, path)
        levels, recon_err = to_levels(pv)
        blob = gzip.compress(med_filter(levels).tobytes(), compresslevel=9, mtime=0)
        lv_name = f"levels/{Path(name).stem}.{Path(name).suffix[1:]}.u8med.gz"
        (OUT / lv_name).write_bytes(blob)
        total_level_bytes += len(blob)
        with Image.open(path) as raw:
            stored = raw.size
            mode = raw.mode
        x = pv.astype(np.float64)
        rec = {
            "name": name,
            "origin": origin,
            "description": desc,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "pil_mode": mode,
            "stored_size": list(stored),
            "width": img.width,
            "height": img.height,
            "grid": [cols, rows],
            "num_tiles": int(pv.shape[0]),
            "shape": list(pv.shape),
            "mean": [float(x[:, c].mean()) for c in range(3)],
            "std": [float(x[:, c].std()) for c in range(3)],
            "first8": [[float(v) for v in pv[t].reshape(-1)[:8]] for t in range(pv.shape[0])],
            "levels": lv_name,
            "levels_sha256": hashlib.sha256(levels.tobytes()).hexdigest(),
            "level_reconstruction_max_abs_err": recon_err,
        }
        records.append(rec)
        print(f"{name:45s} {img.width:5d}x{img.height:<5d} grid {cols}x{rows} tiles {pv.shape[0]:2d} levels {len(blob)/1e3:8.1f} kB")

    median_s, times = time_reference(proc, OUT / "gen_1024.jpg")
    print(f"reference load+preprocess gen_1024.jpg: median {median_s*1e3:.1f} ms over {len(times)} runs (2 threads)")

    meta = {
        "generator": "tools/fixtures_images.py",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
            "libwebp": PIL.features.version("webp"),
            "numpy": np.__version__,
        },
        "processor": {
            "class": "GotOcr2ImageProcessor",
            "size": [TILE, TILE],
            "resample": "BICUBIC (torchvision, antialias=True, uint8)",
            "image_mean": MEAN,
            "image_std": STD,
            "rescale_factor": "1/255",
            "crop_to_patches": True,
            "min_patches": 1,
            "max_patches": 12,
            "loader": "transformers.image_utils.load_image (PIL open, exif_transpose, convert RGB)",
        },
        "levels_format": "gzip of uint8 [tiles,3,448,448], level = round(x*255*std_c + 255*mean_c), stored as "
        "residuals mod 256 of the JPEG-LS median edge predictor (a=left, b=up, c=up-left, zeros outside each "
        "448x448 plane): pred = min(a,b) if c >= max(a,b), max(a,b) if c <= min(a,b), else a+b-c",
        "std_definition": "population standard deviation, float64, per channel over all tiles",
        "reference_timing": {
            "what": "load_image(gen_1024.jpg) + processor(images, crop_to_patches=True, return_tensors='pt')",
            "median_ms": round(median_s * 1e3, 2),
            "runs_ms": [round(t * 1e3, 2) for t in times],
            "torch_threads": 2,
            "machine": f"{platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}",
        },
        "images": records,
    }
    (OUT / "fixtures.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"levels {total_level_bytes/1e6:.2f} MB; folder total {total/1e6:.2f} MB")


if __name__ == "__main__":
    main()
