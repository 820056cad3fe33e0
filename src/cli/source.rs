//! Where `--model` points: a local Hugging Face model folder, or a hub id (`owner/name`) that is looked up
//! in the standard HF cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`) and, when missing there
//! and `HF_HUB_OFFLINE` is not set, downloaded into it with progress. The download path needs the network,
//! which tests do not have: it is kept to a few calls of the `hf-hub` crate.

use std::path::PathBuf;

use anyhow::Context as _;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;

/// Files of a model folder that facellm reads (weights are added from the repo listing).
const WANTED: [&str; 9] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

fn looks_like_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(owner) && ok(name)
}

/// The local folder for `model`.
pub fn resolve(model: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(model);
    if path.is_dir() {
        return Ok(path);
    }
    if !looks_like_hub_id(model) {
        anyhow::bail!(
            "model folder {model} not found (expected a Hugging Face model folder or a hub id like Idiap/FaceLLM-1B)"
        );
    }
    let cache = Cache::from_env();
    if let Some(config) = cache.model(model.to_string()).get("config.json") {
        if let Some(dir) = config.parent() {
            return Ok(dir.to_path_buf());
        }
    }
    if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v != "0") {
        anyhow::bail!(
            "model {model} is not a local folder and not in the Hugging Face cache {} (HF_HUB_OFFLINE is set)",
            cache.path().display()
        );
    }
    download(model, cache).with_context(|| format!("downloading {model} from the Hugging Face hub"))
}

fn download(model: &str, cache: Cache) -> anyhow::Result<PathBuf> {
    let quiet = super::common::QUIET.load(std::sync::atomic::Ordering::Relaxed);
    // hf-hub's errors repeat their causes in their message: keep the message once.
    let flat = |e: hf_hub::api::sync::ApiError| anyhow::anyhow!("{e}");
    let api = ApiBuilder::from_cache(cache).with_progress(!quiet).build().map_err(flat)?;
    let repo = api.model(model.to_string());
    let info = repo.info().map_err(flat)?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| WANTED.contains(&f.as_str()) || f.ends_with(".safetensors") || f == "model.safetensors.index.json")
        .collect();
    if !files.iter().any(|f| f == "config.json") {
        anyhow::bail!("the repository has no config.json; is it a transformers model?");
    }
    let mut dir = None;
    for f in &files {
        let local = repo.get(f).map_err(flat)?;
        if f == "config.json" {
            dir = local.parent().map(|p| p.to_path_buf());
        }
    }
    dir.ok_or_else(|| anyhow::anyhow!("no folder for the downloaded config.json"))
}

#[cfg(test)]
mod tests {
    use super::looks_like_hub_id;

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("Idiap/FaceLLM-1B"));
        assert!(looks_like_hub_id("OpenGVLab/InternVL3-1B-hf"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("name-only"));
    }
}
