//! Streaming detokenization for generation: text is emitted as soon as it is whole UTF-8, never mid-character.
//!
//! Byte-level BPE tokens are byte strings; one character (CJK, emoji) often spans two or three tokens. Full
//! `decode` concatenates the bytes of all tokens and then decodes them lossily, so decoding token by token would
//! print U+FFFD for every split character. This decoder keeps the bytes of an unfinished character back until
//! the next token completes it. Invalid bytes become U+FFFD exactly where the lossy full decode puts them, so
//! the concatenation of all outputs equals `decode(all ids)`.

use std::sync::LazyLock;

use super::Tokenizer;

/// GPT-2's byte <-> character table used by byte-level BPE: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes are shifted to U+0100.. so every token is printable text.
static CHAR_TO_BYTE: LazyLock<std::collections::HashMap<char, u8>> = LazyLock::new(|| {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut shifted = 0u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (c, b)
        })
        .collect()
});

/// The bytes a token stands for, as the byte-level decoder computes them: each character mapped through the
/// table; a token with any character outside it (an added token such as a CJK special) contributes its UTF-8.
pub(crate) fn token_bytes(token: &str, out: &mut Vec<u8>) {
    let start = out.len();
    for c in token.chars() {
        match CHAR_TO_BYTE.get(&c) {
            Some(b) => out.push(*b),
            None => {
                out.truncate(start);
                out.extend_from_slice(token.as_bytes());
                return;
            }
        }
    }
}

/// Incremental decoder over one generated sequence; create it with [`Tokenizer::incremental_decoder`].
pub struct IncrementalDecoder<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    /// Bytes of a character that is not complete yet (at most 3).
    pending: Vec<u8>,
}

impl<'t> IncrementalDecoder<'t> {
    pub(crate) fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        IncrementalDecoder { tokenizer, skip_special_tokens, pending: Vec::new() }
    }

    /// Feeds one token id and returns the text it completes; empty while a character is still incomplete.
    /// Unknown ids contribute nothing, as in [`Tokenizer::decode`].
    pub fn push(&mut self, id: u32) -> String {
        if self.skip_special_tokens && self.tokenizer.is_special(id) {
            return String::new();
        }
        if let Some(token) = self.tokenizer.inner.id_to_token(id) {
            token_bytes(&token, &mut self.pending);
        }
        self.drain(false)
    }

    /// Ends the sequence: a character left incomplete is emitted as U+FFFD, as the full decode does.
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    /// Emits the longest prefix of `pending` whose decoding can no longer change. An invalid sequence is final
    /// as soon as it is seen (lossy decoding replaces each maximal invalid prefix by one U+FFFD); a valid but
    /// truncated sequence at the end is kept unless `eof`.
    fn drain(&mut self, eof: bool) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is the prefix from_utf8 has just checked, so this never falls back.
                    out.push_str(std::str::from_utf8(valid).unwrap_or(""));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        None if eof => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &[];
                            break;
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let len = self.pending.len();
        self.pending.drain(..len - keep);
        out
    }
}
