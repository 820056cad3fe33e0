//! The InternVL3-hf tokenizer folder shipped inside the binary (assets/tokenizer/internvl3_hf/, provenance in its
//! ATTRIBUTION.md), so `facellm` can tokenize without a downloaded checkpoint and tests can build demo models.

use std::path::Path;

use super::load::FolderFiles;
use crate::{Error, Result};

const VOCAB: &[u8] = include_bytes!("../../assets/tokenizer/internvl3_hf/vocab.json");
const MERGES: &[u8] = include_bytes!("../../assets/tokenizer/internvl3_hf/merges.txt");
const CONFIG: &[u8] = include_bytes!("../../assets/tokenizer/internvl3_hf/tokenizer_config.json");
const TEMPLATE: &[u8] = include_bytes!("../../assets/tokenizer/internvl3_hf/chat_template.jinja");

/// The bundled files by name, as they appear in an InternVL3-hf checkpoint folder (without tokenizer.json).
pub const INTERNVL3_FILES: [(&str, &[u8]); 4] = [
    ("vocab.json", VOCAB),
    ("merges.txt", MERGES),
    ("tokenizer_config.json", CONFIG),
    ("chat_template.jinja", TEMPLATE),
];

pub(crate) fn files() -> FolderFiles {
    FolderFiles {
        origin: "bundled InternVL3 tokenizer".to_string(),
        vocab: Some(VOCAB.to_vec()),
        merges: Some(MERGES.to_vec()),
        tokenizer_config: Some(CONFIG.to_vec()),
        chat_template_jinja: Some(TEMPLATE.to_vec()),
        ..Default::default()
    }
}

/// Writes the bundled tokenizer files into `dir` (created if needed), making it a loadable tokenizer folder.
pub fn write_internvl3_files(dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (name, bytes) in INTERNVL3_FILES {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}
