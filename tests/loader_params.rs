//! Parameter counts derived from the full InternVL3 configs equal MODEL_SPEC §7, per component and in total.

use std::path::Path;

use facellm::config::ModelConfig;
use facellm::loader::{expected_tensors, Component};

fn counts(name: &str) -> facellm::loader::Summary {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/full").join(name);
    let cfg = ModelConfig::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    expected_tensors(&cfg).summary(2)
}

#[test]
fn model_spec_section_7_totals() {
    // (name, vision, projector, embed, llm layers + final norm, lm_head, total)
    for (name, vision, projector, embed, layers, total) in [
        ("internvl3_1b", 304_012_288u64, 4_482_816u64, 135_899_904u64, 357_897_216u64 + 896, 938_193_024u64),
        ("internvl3_8b", 304_012_288, 27_540_480, 543_599_616, 6_525_618_176 + 3_584, 7_944_373_760),
        ("internvl3_38b", 5_536_496_000, 91_786_240, 776_570_880, 31_206_735_872 + 5_120, 38_388_164_992),
    ] {
        let s = counts(name);
        let p = |c| s.get(c).map_or(0, |x| x.params);
        assert_eq!(p(Component::VisionTower), vision, "{name} vision");
        assert_eq!(p(Component::Projector), projector, "{name} projector");
        assert_eq!(p(Component::EmbedTokens), embed, "{name} embed_tokens");
        assert_eq!(p(Component::LlmLayers), layers, "{name} llm layers");
        assert_eq!(p(Component::LmHead), embed, "{name} lm_head (untied, same shape as embeddings)");
        assert_eq!(s.total_params, total, "{name} total");
        assert_eq!(s.total_bytes, total * 2, "{name} bf16 bytes");
    }
}
