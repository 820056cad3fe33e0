//! Typed reads from one JSON object of a config file. Every failure becomes an `Error::Config` that names the
//! file and the dotted field path (`text_config.num_key_value_heads`), which serde's derive cannot do for
//! defaulted, multi-shaped fields like `image_size: int | [h, w]` or `eos_token_id: int | [int]`.
//!
//! A JSON `null` reads as "absent" everywhere except through [`Obj::raw`], because transformers treats an
//! explicit `None` as "use the default" for the fields facellm reads (the one exception, `num_key_value_heads`,
//! is handled by its caller).

use serde_json::{Map, Value};

use crate::{Error, Result};

pub(crate) struct Obj<'a> {
    file: &'a str,
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    pub(crate) fn root(file: &'a str, value: &'a Value) -> Result<Self> {
        match value {
            Value::Object(map) => Ok(Obj { file, prefix: String::new(), map }),
            other => Err(Error::Config {
                file: file.to_string(),
                field: "(top level)".to_string(),
                msg: format!("expected a JSON object, got {}", kind(other)),
            }),
        }
    }

    pub(crate) fn file(&self) -> &'a str {
        self.file
    }

    pub(crate) fn path(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    pub(crate) fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::Config { file: self.file.to_string(), field: self.path(key), msg: msg.into() }
    }

    /// The value as stored, `null` included.
    pub(crate) fn raw(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub(crate) fn sub(&self, key: &str) -> Result<Option<Obj<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj { file: self.file, prefix: format!("{}.", self.path(key)), map })),
            Some(other) => Err(self.err(key, format!("expected an object, got {}", kind(other)))),
        }
    }

    pub(crate) fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.as_usize(key, v)).transpose()
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    pub(crate) fn i64_or(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_i64().ok_or_else(|| self.err(key, format!("expected an integer, got {v}"))),
        }
    }

    pub(crate) fn u32_opt(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|v| self.as_u32(key, v)).transpose()
    }

    pub(crate) fn u32_or(&self, key: &str, default: u32) -> Result<u32> {
        Ok(self.u32_opt(key)?.unwrap_or(default))
    }

    /// Integers are accepted where a float is expected (`"factor": 2`), as Python does.
    pub(crate) fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    pub(crate) fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.err(key, format!("expected a string, got {v}"))),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        Ok(self.str_opt(key)?.unwrap_or(default))
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.err(key, format!("expected a list of strings, found {v}")))
                })
                .collect(),
            Some(v) => Err(self.err(key, format!("expected a list of strings, got {v}"))),
        }
    }

    /// Token ids stored as one integer or a list (`eos_token_id`); absent gives an empty list.
    pub(crate) fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| self.as_u32(key, v)).collect(),
            Some(v) => Ok(vec![self.as_u32(key, v)?]),
        }
    }

    /// A size stored as one integer (square) or as `[height, width]`.
    pub(crate) fn size2_or(&self, key: &str, default: [usize; 2]) -> Result<[usize; 2]> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Array(items)) if items.len() == 2 => {
                Ok([self.as_usize(key, &items[0])?, self.as_usize(key, &items[1])?])
            }
            Some(Value::Array(items)) => {
                Err(self.err(key, format!("expected an integer or [height, width], got {} values", items.len())))
            }
            Some(v) => {
                let n = self.as_usize(key, v)?;
                Ok([n, n])
            }
        }
    }

    /// The dtype the weights were saved in. transformers 4.x wrote `torch_dtype`, v5 writes `dtype`; v5 keeps
    /// `dtype` when both are present.
    pub(crate) fn dtype(&self) -> Result<Option<String>> {
        Ok(self.str_opt("dtype")?.or(self.str_opt("torch_dtype")?).map(str::to_string))
    }

    fn as_usize(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}")))
    }

    fn as_u32(&self, key: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.err(key, format!("expected a token id (integer in 0..2^32), got {v}")))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Reads and parses a JSON file; a missing file is an `Io` error naming it, bad JSON a `Config` error.
pub(crate) fn read_json(path: &std::path::Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        file: path.display().to_string(),
        field: "(json)".to_string(),
        msg: format!("invalid JSON: {e}"),
    })
}
