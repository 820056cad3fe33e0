//! Parameter and byte counts per model component, for `facellm info` (MODEL_SPEC §7 uses the same split).

use serde::Serialize;

use super::names::{EMBED_TOKENS, LLM_PREFIX, LM_HEAD, PROJECTOR_PREFIX, VISION_PREFIX};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    VisionTower,
    Projector,
    EmbedTokens,
    /// Decoder layers plus the final norm.
    LlmLayers,
    LmHead,
    Other,
}

impl Component {
    /// The component of a canonical tensor name.
    pub fn of(name: &str) -> Self {
        if name.starts_with(VISION_PREFIX) {
            Component::VisionTower
        } else if name.starts_with(PROJECTOR_PREFIX) {
            Component::Projector
        } else if name == EMBED_TOKENS {
            Component::EmbedTokens
        } else if name.starts_with(LLM_PREFIX) {
            Component::LlmLayers
        } else if name == LM_HEAD {
            Component::LmHead
        } else {
            Component::Other
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComponentSummary {
    pub component: Component,
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Only components that have tensors, in `Component` order.
    pub components: Vec<ComponentSummary>,
    pub total_params: u64,
    pub total_bytes: u64,
}

impl Summary {
    /// Sums `(canonical name, shape, bytes per element)` items.
    pub fn from_tensors<'a>(items: impl IntoIterator<Item = (&'a str, &'a [usize], usize)>) -> Self {
        let mut by: std::collections::BTreeMap<Component, ComponentSummary> = Default::default();
        for (name, shape, elem_bytes) in items {
            let c = Component::of(name);
            let e = by.entry(c).or_insert(ComponentSummary { component: c, tensors: 0, params: 0, bytes: 0 });
            let n: u64 = shape.iter().map(|&d| d as u64).product();
            e.tensors += 1;
            e.params += n;
            e.bytes += n * elem_bytes as u64;
        }
        let components: Vec<_> = by.into_values().collect();
        Summary {
            total_params: components.iter().map(|c| c.params).sum(),
            total_bytes: components.iter().map(|c| c.bytes).sum(),
            components,
        }
    }

    pub fn get(&self, c: Component) -> Option<&ComponentSummary> {
        self.components.iter().find(|s| s.component == c)
    }
}

impl super::names::Expected {
    /// What a checkpoint of this config holds, at `elem_bytes` per parameter (2 for bf16); tied-away
    /// optional tensors are not counted.
    pub fn summary(&self, elem_bytes: usize) -> Summary {
        Summary::from_tensors(self.required.iter().map(|(n, s)| (n.as_str(), s.as_slice(), elem_bytes)))
    }
}
