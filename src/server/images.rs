//! Images of a request: `image_url` parts given as `data:` URLs (base64 JPEG, PNG or WebP) or, only when the
//! operator allowed a folder, paths under it. Each image is hashed (SHA-256 of the bytes and the tiling
//! options) and looked up in the vision cache; only a miss is decoded and tiled, here on the HTTP side so
//! the engine thread never spends time on it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::error::ApiError;
use crate::engine::batch::{EngineMetrics, ImageDigest, ImageInput, ImageSource, VisionCache};
use crate::image::{preprocess_bytes, ImageOptions};
use crate::tensor::Tensor;

/// What images a request may send.
#[derive(Debug, Clone)]
pub struct ImagePolicy {
    /// Canonical folder whose files may be named by path (`--allow-local-images`); `None`: data URLs only.
    pub local_dir: Option<PathBuf>,
    /// Largest encoded image, in bytes.
    pub max_bytes: usize,
    /// Tiling (`max_tiles` per image) and the pixel limit checked before decoding.
    pub options: ImageOptions,
}

const MEDIA_TYPES: [&str; 4] = ["image/jpeg", "image/jpg", "image/png", "image/webp"];

/// Accepts standard base64 with or without padding.
const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The encoded bytes an image URL stands for; `param` names the part in errors.
pub fn fetch(url: &str, policy: &ImagePolicy, param: &str) -> Result<Vec<u8>, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        return data_url(rest, policy.max_bytes, param);
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(ApiError::param(
            "unsupported_image_url",
            param,
            "remote image URLs are not fetched by this server; send the image as a data: URL \
             (data:image/jpeg;base64,...)",
        ));
    }
    let Some(dir) = &policy.local_dir else {
        return Err(ApiError::param(
            "unsupported_image_url",
            param,
            "image URLs must be data: URLs (data:image/jpeg;base64,...); local paths are accepted only when the \
             server runs with --allow-local-images DIR",
        ));
    };
    local_file(url.strip_prefix("file://").unwrap_or(url), dir, policy.max_bytes, param)
}

fn data_url(rest: &str, max_bytes: usize, param: &str) -> Result<Vec<u8>, ApiError> {
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(ApiError::param("invalid_image_url", param, "a data: URL needs a comma before its data"));
    };
    let mut fields = meta.split(';');
    let media = fields.next().unwrap_or("").trim().to_ascii_lowercase();
    if !fields.any(|f| f.trim().eq_ignore_ascii_case("base64")) {
        return Err(ApiError::param(
            "invalid_image_url",
            param,
            "the data: URL must be base64 (data:image/png;base64,...)",
        ));
    }
    if !MEDIA_TYPES.contains(&media.as_str()) {
        return Err(ApiError::param(
            "unsupported_image_type",
            param,
            format!("image type {media:?} is not supported; send image/jpeg, image/png or image/webp"),
        ));
    }
    // Refuse from the length alone: 4 base64 characters carry 3 bytes.
    if payload.len() / 4 * 3 > max_bytes + 3 {
        return Err(too_big(param, payload.len() / 4 * 3, max_bytes));
    }
    let compact: std::borrow::Cow<str> = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        payload.chars().filter(|c| !c.is_ascii_whitespace()).collect::<String>().into()
    } else {
        payload.into()
    };
    let bytes = B64
        .decode(compact.as_bytes())
        .map_err(|e| ApiError::param("invalid_image", param, format!("the image's base64 data is not valid: {e}")))?;
    if bytes.len() > max_bytes {
        return Err(too_big(param, bytes.len(), max_bytes));
    }
    if bytes.is_empty() {
        return Err(ApiError::param("invalid_image", param, "the image is empty"));
    }
    Ok(bytes)
}

fn too_big(param: &str, got: usize, max: usize) -> ApiError {
    ApiError::param("image_too_large", param, format!("the image has {got} bytes; this server takes at most {max}"))
}

fn local_file(path: &str, dir: &Path, max_bytes: usize, param: &str) -> Result<Vec<u8>, ApiError> {
    let p = Path::new(path);
    let joined = if p.is_absolute() { p.to_path_buf() } else { dir.join(p) };
    let not_found =
        || ApiError::param("invalid_image_url", param, format!("no image file {path:?} in the allowed folder"));
    // Canonical paths resolve `..` and symbolic links, so the containment check cannot be walked around.
    let real = joined.canonicalize().map_err(|_| not_found())?;
    if !real.starts_with(dir) {
        return Err(ApiError::param(
            "invalid_image_url",
            param,
            format!("image path {path:?} is outside the folder this server may read"),
        ));
    }
    let meta = std::fs::metadata(&real).map_err(|_| not_found())?;
    if !meta.is_file() {
        return Err(not_found());
    }
    if meta.len() > max_bytes as u64 {
        return Err(too_big(param, meta.len().try_into().unwrap_or(usize::MAX), max_bytes));
    }
    std::fs::read(&real).map_err(|e| ApiError::param("invalid_image_url", param, format!("cannot read {path:?}: {e}")))
}

/// The cache key of an image: its bytes and everything that decides its tiles.
pub fn digest(bytes: &[u8], opts: &ImageOptions) -> ImageDigest {
    let mut h = Sha256::new();
    h.update(b"facellm-image-v1\0");
    h.update(format!("{}/{}/{}\0", opts.tiling, opts.min_tiles, opts.max_tiles).as_bytes());
    h.update(bytes);
    h.finalize().into()
}

/// The engine's input for one image: cached features when the vision cache has them, else preprocessed
/// tiles. Decoding errors (not an image, truncated, over the pixel limit) are the client's: 400.
pub fn prepare(
    bytes: &[u8],
    policy: &ImagePolicy,
    vision: &Mutex<VisionCache>,
    metrics: &EngineMetrics,
    param: &str,
) -> Result<ImageInput, ApiError> {
    let key = digest(bytes, &policy.options);
    if let Some((features, tiles)) = vision.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        metrics.vision_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(ImageInput { digest: key, tiles, source: ImageSource::Features(features) });
    }
    let pre = preprocess_bytes(bytes, param, &policy.options).map_err(|e| {
        let msg = match e {
            crate::Error::Image { msg, .. } => msg,
            other => other.to_string(),
        };
        ApiError::param("invalid_image", param, format!("cannot use the image: {msg}"))
    })?;
    let tiles = pre.num_tiles;
    let pixels = Tensor::from_f32(pre.shape().to_vec(), pre.pixel_values)
        .map_err(|e| ApiError::internal(format!("image tensor: {e}")))?;
    Ok(ImageInput { digest: key, tiles, source: ImageSource::Pixels(pixels) })
}
