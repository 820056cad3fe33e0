//! Bad inputs: each gets `Error::Image` (or `Error::Invalid` for bad options) naming the input, none panics.

use std::path::{Path, PathBuf};

use facellm::image::{preprocess_bytes, preprocess_file, ImageOptions};
use facellm::Error;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images").join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The message of an `Error::Image` for `source`, failing on any other outcome.
fn image_error(bytes: &[u8], source: &str, opts: &ImageOptions) -> String {
    match preprocess_bytes(bytes, source, opts) {
        Err(Error::Image { source_name, msg }) => {
            assert_eq!(source_name, source);
            let shown = Error::Image { source_name, msg: msg.clone() }.to_string();
            assert!(shown.contains(source), "{shown}");
            msg
        }
        Err(e) => panic!("{source}: expected Error::Image, got {e:?}"),
        Ok(p) => panic!("{source}: expected an error, got {:?} tiles", p.num_tiles),
    }
}

#[test]
fn empty_file() {
    let msg = image_error(&[], "empty.jpg", &ImageOptions::default());
    assert!(msg.contains("empty"), "{msg}");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("empty.png");
    std::fs::write(&path, b"").expect("write");
    match preprocess_file(&path, &ImageOptions::default()) {
        Err(Error::Image { source_name, msg }) => {
            assert!(source_name.ends_with("empty.png") && msg.contains("empty"), "{source_name}: {msg}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_file_is_an_io_error() {
    match preprocess_file(Path::new("/nonexistent/face.jpg"), &ImageOptions::default()) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("/nonexistent/face.jpg")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_jpeg() {
    let full = read("gen_1024.jpg");
    for cut in [full.len() / 2, full.len() - 100, 700, 200, 20, 3] {
        let msg = image_error(&full[..cut], "cut.jpg", &ImageOptions::default());
        assert!(msg.contains("truncated") || msg.contains("corrupt"), "cut at {cut}: {msg}");
    }
    // Half of the data is missing: that is truncation, not corruption.
    let msg = image_error(&full[..full.len() / 2], "half.jpg", &ImageOptions::default());
    assert!(msg.contains("truncated"), "{msg}");
    // Progressive file cut between scans.
    let prog = read("gen_exif_rot3.jpg");
    let msg = image_error(&prog[..prog.len() * 3 / 4], "prog.jpg", &ImageOptions::default());
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn truncated_png_and_webp() {
    for name in ["gen_rgba.png", "gen_lossy.webp", "gen.bmp", "gen_anim.gif"] {
        let full = read(name);
        image_error(&full[..full.len() / 2], name, &ImageOptions::default());
    }
}

#[test]
fn text_file_named_jpg() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.jpg");
    std::fs::write(&path, "this is not an image\n").expect("write");
    match preprocess_file(&path, &ImageOptions::default()) {
        Err(Error::Image { source_name, msg }) => {
            assert!(source_name.ends_with("notes.jpg"), "{source_name}");
            assert!(msg.contains("not a JPEG, PNG, WebP, BMP or GIF"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn max_tiles_out_of_range() {
    let bytes = read("fairface_repo_race_White_face0.jpg");
    for max_tiles in [0, 13, 100] {
        let opts = ImageOptions { max_tiles, ..Default::default() };
        match preprocess_bytes(&bytes, "face.jpg", &opts) {
            Err(Error::Invalid(msg)) => assert!(msg.contains("max_tiles") && msg.contains("1..=12"), "{msg}"),
            other => panic!("max_tiles {max_tiles}: {other:?}"),
        }
        match preprocess_file(&fixture("fairface_repo_race_White_face0.jpg"), &opts) {
            Err(Error::Invalid(_)) => {}
            other => panic!("max_tiles {max_tiles}: {other:?}"),
        }
    }
    let opts = ImageOptions { min_tiles: 5, max_tiles: 4, ..Default::default() };
    assert!(matches!(preprocess_bytes(&bytes, "face.jpg", &opts), Err(Error::Invalid(_))));
    for max_tiles in [1, 12] {
        let opts = ImageOptions { max_tiles, ..Default::default() };
        assert!(preprocess_bytes(&bytes, "face.jpg", &opts).is_ok());
    }
}

#[test]
fn pixel_limit_exceeded() {
    // 300x300 = 90000 pixels.
    let bytes = read("fairface_repo_race_Asian_face0.jpg");
    let opts = ImageOptions { max_pixels: 89_999, ..Default::default() };
    let msg = image_error(&bytes, "face.jpg", &opts);
    assert!(msg.contains("300x300") && msg.contains("limit"), "{msg}");
    let opts = ImageOptions { max_pixels: 90_000, ..Default::default() };
    assert!(preprocess_bytes(&bytes, "face.jpg", &opts).is_ok());
    for name in ["gen_rgba.png", "gen_lossy.webp", "gen.bmp", "gen_anim.gif"] {
        let opts = ImageOptions { max_pixels: 1000, ..Default::default() };
        let msg = image_error(&read(name), name, &opts);
        assert!(msg.contains("limit"), "{name}: {msg}");
    }
}

/// Headers that promise 60000x60000 pixels with no data behind them: refused on the header, before any
/// allocation or decoding (the data is missing, so anything else would report truncation instead).
#[test]
fn decompression_bombs_are_refused_from_the_header() {
    let mut jpeg = vec![0xFF, 0xD8];
    jpeg.extend_from_slice(&[0xFF, 0xC0, 0, 17, 8, 0xEA, 0x60, 0xEA, 0x60, 3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
    let msg = image_error(&jpeg, "bomb.jpg", &ImageOptions::default());
    assert!(msg.contains("60000x60000") && msg.contains("limit"), "{msg}");

    // A PNG decoder reads up to the first IDAT before it reports the size: give it a few bytes of one.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &[0, 0, 0xEA, 0x60, 0, 0, 0xEA, 0x60, 8, 2, 0, 0, 0]));
    png.extend(png_chunk(b"IDAT", &[0x78, 0x01, 0, 0, 0]));
    png.extend(png_chunk(b"IEND", &[]));
    let msg = image_error(&png, "bomb.png", &ImageOptions::default());
    assert!(msg.contains("60000x60000") && msg.contains("limit"), "{msg}");
}

fn png_chunk(t: &[u8], d: &[u8]) -> Vec<u8> {
    let mut c = (d.len() as u32).to_be_bytes().to_vec();
    let mut body = t.to_vec();
    body.extend_from_slice(d);
    c.extend_from_slice(&body);
    c.extend_from_slice(&crc32(&body).to_be_bytes());
    c
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn sixteen_bit_gray_png_is_refused_with_a_reason() {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let chunk = png_chunk;
    png.extend(chunk(b"IHDR", &[0, 0, 0, 2, 0, 0, 0, 1, 16, 0, 0, 0, 0]));
    // zlib stored block with one filtered row: filter 0, two 16-bit samples.
    let raw = [0u8, 0x12, 0x34, 0xAB, 0xCD];
    let mut z = vec![0x78, 0x01, 1, raw.len() as u8, 0, !(raw.len() as u8), 0xFF];
    z.extend_from_slice(&raw);
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    png.extend(chunk(b"IDAT", &z));
    png.extend(chunk(b"IEND", &[]));
    let msg = image_error(&png, "gray16.png", &ImageOptions::default());
    assert!(msg.contains("16-bit grayscale"), "{msg}");
}

/// Seeded corruption of real files: flipped bytes, cut tails, spliced garbage. Any result is fine but a panic.
#[test]
fn corrupted_inputs_never_panic() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let opts = ImageOptions { max_pixels: 4_000_000, ..Default::default() };
    for name in [
        "gen_odd_restart.jpg",
        "gen_exif_rot3.jpg",
        "gen_exif_rot8.jpg",
        "gen_gray.jpg",
        "gen_rgba.png",
        "gen_lossy.webp",
    ] {
        let orig = read(name);
        let (mut ok, mut err) = (0, 0);
        for _ in 0..120 {
            let mut b = orig.clone();
            match next() % 3 {
                0 => {
                    for _ in 0..1 + next() % 8 {
                        let i = (next() as usize) % b.len();
                        b[i] = next() as u8;
                    }
                }
                1 => b.truncate((next() as usize) % b.len()),
                _ => {
                    let i = (next() as usize) % b.len();
                    let junk: Vec<u8> = (0..1 + next() % 64).map(|_| next() as u8).collect();
                    b.splice(i..i, junk);
                }
            }
            match preprocess_bytes(&b, name, &opts) {
                Ok(p) => {
                    assert_eq!(p.pixel_values.len(), p.num_tiles * 3 * 448 * 448);
                    ok += 1
                }
                Err(_) => err += 1,
            }
        }
        println!("{name}: {ok} decoded, {err} refused");
    }
}
