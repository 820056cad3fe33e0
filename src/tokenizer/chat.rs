//! Conversations and chat templates: messages whose content is a string or a list of typed parts
//! (`{"type": "text", "text": ...}`, `{"type": "image"}`), rendered by the model folder's own Jinja template the
//! way transformers' `apply_chat_template` renders it.

use minijinja::Environment;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::jinja;
use crate::{Error, Result};

/// The chat template of InternVL3-hf checkpoints (hub `chat_template.jinja`, 481 bytes, MODEL_SPEC §5.2):
/// every image part becomes `<IMG_CONTEXT>\n`, no default system prompt.
pub const INTERNVL3_CHAT_TEMPLATE: &str = include_str!("../../assets/tokenizer/internvl3_hf/chat_template.jinja");

/// One message of a conversation. Fields other than `role` and `content` (`tool_calls`, `name`, ...) are kept and
/// passed to the template as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    /// `None` is rendered as the template's `none`, as transformers passes Python's `None`.
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A typed content part; `kind` is the `type` field (`text`, `image`, `video`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

impl Part {
    pub fn text(text: impl Into<String>) -> Self {
        Part { kind: "text".into(), text: Some(text.into()), extra: Map::new() }
    }

    /// An image placeholder; the pixels travel separately, in the same order as the image parts.
    pub fn image() -> Self {
        Part { kind: "image".into(), text: None, extra: Map::new() }
    }
}

impl Message {
    pub fn new(role: impl Into<String>, content: Content) -> Self {
        Message { role: role.into(), content: Some(content), extra: Map::new() }
    }

    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self::new(role, Content::Text(text.into()))
    }

    pub fn parts(role: impl Into<String>, parts: Vec<Part>) -> Self {
        Self::new(role, Content::Parts(parts))
    }

    /// Number of parts of the given type (`image`, `video`).
    pub fn count_parts(&self, kind: &str) -> usize {
        match &self.content {
            Some(Content::Parts(p)) => p.iter().filter(|p| p.kind == kind).count(),
            _ => 0,
        }
    }
}

/// Options of one rendering, as the keyword arguments of `apply_chat_template`.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    /// JSON tool schemas (a list), passed as `tools`; `None` renders as the template's `none`.
    pub tools: Option<Json>,
    pub documents: Option<Json>,
    /// Which of the folder's named templates to use; `None` picks the one called `default`.
    pub template: Option<String>,
    /// Further template variables; they override the special-token variables, as kwargs do in transformers.
    pub extra: Map<String, Json>,
}

/// A compiled set of named chat templates.
pub struct ChatTemplate {
    env: Environment<'static>,
    sources: Vec<(String, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("names", &self.names()).finish()
    }
}

impl ChatTemplate {
    /// One template, used as `default`.
    pub fn new(source: &str) -> Result<Self> {
        Self::from_named(vec![("default".to_string(), source.to_string())])
    }

    /// Named templates (transformers' list form); each is compiled now so syntax errors surface at load.
    pub fn from_named(sources: Vec<(String, String)>) -> Result<Self> {
        if sources.is_empty() {
            return Err(Error::Template("no chat template given".into()));
        }
        let mut env = jinja::environment();
        for (name, source) in &sources {
            env.add_template_owned(name.clone(), source.clone())
                .map_err(|e| Error::Template(format!("template {name:?}: {}", describe(&e))))?;
        }
        Ok(ChatTemplate { env, sources })
    }

    /// The built-in InternVL3-hf template.
    pub fn internvl3() -> Result<Self> {
        Self::new(INTERNVL3_CHAT_TEMPLATE)
    }

    pub fn names(&self) -> Vec<&str> {
        self.sources.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn source(&self, name: &str) -> Option<&str> {
        self.sources.iter().find(|(n, _)| n == name).map(|(_, s)| s.as_str())
    }

    /// Renders a conversation. `vars` are the tokenizer's special-token variables (`eos_token`, ...).
    pub fn render(&self, messages: &[Message], opts: &RenderOptions, vars: &[(String, String)]) -> Result<String> {
        let name = match &opts.template {
            Some(n) if self.source(n).is_some() => n.clone(),
            Some(n) => return Err(Error::Template(format!("no chat template named {n:?}; have {:?}", self.names()))),
            None if self.source("default").is_some() => "default".to_string(),
            None => {
                return Err(Error::Template(format!(
                    "several chat templates {:?} and none named \"default\"; choose one",
                    self.names()
                )))
            }
        };
        let template = self.env.get_template(&name).map_err(|e| Error::Template(describe(&e)))?;
        let mut ctx = Map::new();
        for (k, v) in vars {
            ctx.insert(k.clone(), Json::String(v.clone()));
        }
        ctx.insert("messages".into(), serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?);
        ctx.insert("tools".into(), opts.tools.clone().unwrap_or(Json::Null));
        ctx.insert("documents".into(), opts.documents.clone().unwrap_or(Json::Null));
        ctx.insert("add_generation_prompt".into(), Json::Bool(opts.add_generation_prompt));
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        template.render(ctx).map_err(|e| Error::Template(format!("rendering {name:?}: {}", describe(&e))))
    }
}

/// minijinja's message plus the causes it chains (a `raise_exception` message sits in the detail).
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
