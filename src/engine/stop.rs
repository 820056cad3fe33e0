//! Stop strings over streamed text. Text is released to the caller only once it can no longer turn out
//! to be the start of a stop string, so a stop string never reaches the stream, even split over tokens.

/// Tracks the decoded text of a generation and how much of it was already released.
pub struct StopMatcher {
    stops: Vec<String>,
    released: usize,
}

/// What the newest text means for the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum StopState {
    /// Keep going; `release` is safe to emit now.
    Continue { release: String },
    /// A stop string was found: emit `release` (the text before it) and finish; `text` is the final answer.
    Stopped { release: String, text: String },
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), released: 0 }
    }

    /// `text` is the whole decoded answer so far; a trailing U+FFFD (an unfinished UTF-8 sequence of a
    /// byte-level token) is never released, since the next token may complete it.
    pub fn update(&mut self, text: &str) -> StopState {
        if let Some(cut) = self.stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            let release = text.get(self.released..cut).unwrap_or("").to_string();
            self.released = cut;
            return StopState::Stopped { release, text: text[..cut].to_string() };
        }
        let mut safe = text.trim_end_matches('\u{FFFD}').len();
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|prefix| text[..safe].ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        safe -= hold;
        let safe = safe.max(self.released);
        let release = text[self.released..safe].to_string();
        self.released = safe;
        StopState::Continue { release }
    }

    /// At the end of generation everything left is released.
    pub fn finish(&mut self, text: &str) -> String {
        let rest = text.get(self.released..).unwrap_or("").to_string();
        self.released = text.len();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let (mut text, mut out) = (String::new(), String::new());
        for p in pieces {
            text.push_str(p);
            match m.update(&text) {
                StopState::Continue { release } => out.push_str(&release),
                StopState::Stopped { release, .. } => {
                    out.push_str(&release);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish(&text));
        (out, false)
    }

    #[test]
    fn stop_split_over_pieces_never_leaks() {
        assert_eq!(run(&["</s>"], &["Hello <", "/", "s> tail"]), ("Hello ".to_string(), true));
    }

    #[test]
    fn held_back_prefix_is_released_when_it_diverges() {
        assert_eq!(run(&["STOP"], &["a ST", "ART"]), ("a START".to_string(), false));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".to_string(), true));
    }

    #[test]
    fn incomplete_utf8_is_held() {
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.update("ab\u{FFFD}"), StopState::Continue { release: "ab".into() });
        assert_eq!(m.update("ab\u{e9}"), StopState::Continue { release: "\u{e9}".into() });
    }
}
