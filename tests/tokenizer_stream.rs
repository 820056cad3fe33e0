//! Incremental decoding: whatever the id sequence (text cut at random token boundaries, random ids, special
//! tokens), the chunks concatenate to the full decode, and text that is valid UTF-8 never shows U+FFFD mid-stream.

use std::sync::LazyLock;

use facellm::tokenizer::Tokenizer;

static TOK: LazyLock<Tokenizer> = LazyLock::new(|| Tokenizer::internvl3().expect("bundled tokenizer loads"));

/// Small seeded generator (xorshift64*), so failures reproduce from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn stream(ids: &[u32], skip: bool) -> Vec<String> {
    let mut dec = TOK.incremental_decoder(skip);
    let mut chunks: Vec<String> = ids.iter().map(|&id| dec.push(id)).collect();
    chunks.push(dec.finish());
    chunks
}

fn check(ids: &[u32], skip: bool, ctx: &str) {
    let chunks = stream(ids, skip);
    let full = TOK.decode(ids, skip).expect("decode");
    assert_eq!(chunks.concat(), full, "{ctx}: ids {ids:?} skip={skip}, chunks {chunks:?}");
}

const TEXTS: [&str; 8] = [
    "你好，世界！我是一个人工智能助手。",
    "😀😃😄👍🏽👨‍👩‍👧‍👦🏳️‍🌈🇫🇷🇯🇵",
    "mixed 中文 and English 😀 123 naïve café",
    "日本語のテキスト、한국어 텍스트입니다",
    "<|im_start|>user\n<img><IMG_CONTEXT></img>\n这张脸的年龄是多少？😊<|im_end|>\n",
    "Ελληνικά العربية हिन्दी ภาษาไทย",
    "{\"gender\": \"女\", \"age\": \"20-29\"}",
    "🤖🤖🤖🤖🤖🤖🤖🤖 emoji at end 🎉",
];

#[test]
fn valid_text_streams_without_replacement_characters() {
    for text in TEXTS {
        let ids = TOK.encode(text).expect("encode");
        for skip in [false, true] {
            let chunks = stream(&ids, skip);
            assert_eq!(chunks.concat(), TOK.decode(&ids, skip).expect("decode"), "{text:?}");
            assert!(chunks.iter().all(|c| !c.contains('\u{fffd}')), "{text:?}: U+FFFD in {chunks:?}");
        }
        // Multi-token characters must be held back: at least one push returns nothing for CJK/emoji text.
        let chunks = stream(&ids, false);
        if ids.len() > text.chars().count() {
            assert!(chunks.iter().any(String::is_empty), "{text:?}: nothing was held back: {chunks:?}");
        }
    }
}

#[test]
fn random_cuts_and_concatenations_equal_full_decode() {
    let seed = 0x5eed_2026_1126_u64;
    let mut rng = Rng(seed);
    let pools: Vec<Vec<u32>> = TEXTS.iter().map(|t| TOK.encode(t).expect("encode")).collect();
    for round in 0..400 {
        // A window of a real sequence (may start and end inside a character) followed by another one.
        let a = &pools[rng.below(pools.len())];
        let b = &pools[rng.below(pools.len())];
        let (s, e) = (rng.below(a.len()), rng.below(a.len() + 1));
        let (s, e) = (s.min(e), s.max(e));
        let mut ids: Vec<u32> = a[s..e].to_vec();
        ids.extend_from_slice(&b[..rng.below(b.len() + 1)]);
        check(&ids, round % 2 == 0, &format!("seed {seed:#x} round {round}"));
    }
}

#[test]
fn random_ids_equal_full_decode() {
    let seed = 0xdead_beef_u64;
    let mut rng = Rng(seed);
    let vocab = TOK.vocab_size();
    for round in 0..300 {
        let n = 1 + rng.below(24);
        // Mostly single-byte tokens (ids < 256) so invalid and truncated UTF-8 is common, plus any id at all,
        // plus ids past the vocabulary, which decode skips.
        let ids: Vec<u32> = (0..n)
            .map(|_| match rng.below(4) {
                0 | 1 => rng.below(256) as u32,
                2 => rng.below(vocab) as u32,
                _ => (vocab + rng.below(10)) as u32,
            })
            .collect();
        check(&ids, round % 3 == 0, &format!("seed {seed:#x} round {round}"));
    }
}

#[test]
fn split_character_is_emitted_when_complete() {
    // "你" (E4 BD A0) fed as its three single-byte tokens.
    let bytes = "你".as_bytes();
    let ids: Vec<u32> = bytes
        .iter()
        .map(|b| {
            let sym = byte_symbol(*b);
            TOK.token_to_id(&sym.to_string()).expect("byte token")
        })
        .collect();
    let mut dec = TOK.incremental_decoder(false);
    assert_eq!(dec.push(ids[0]), "");
    assert_eq!(dec.push(ids[1]), "");
    assert_eq!(dec.push(ids[2]), "你");
    assert_eq!(dec.finish(), "");
    // A truncated character at the end is flushed as one U+FFFD, like the full decode.
    let mut dec = TOK.incremental_decoder(false);
    assert_eq!(dec.push(ids[0]), "");
    assert_eq!(dec.push(ids[1]), "");
    assert_eq!(dec.finish(), "\u{fffd}");
    assert_eq!(TOK.decode(&ids[..2], false).expect("decode"), "\u{fffd}");
}

/// GPT-2 byte-level symbol of a byte (printable Latin-1 stands for itself; others are shifted past U+00FF).
fn byte_symbol(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + n).expect("valid char")
}
