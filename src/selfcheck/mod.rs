//! `facellm selfcheck`: every CUDA kernel against its CPU twin on fresh random inputs, then whole towers and
//! models on both devices, printed as one table. The comparison and reporting live here (device-free, unit
//! tested); the checks themselves are in `cuda/` behind feature `cuda`.
//!
//! Rules every check follows: inputs are random bf16 values from a seeded stream (the seed is printed, so a
//! failure can be replayed with `--seed`); the CPU twin computes in f32 from exactly the bf16 values the GPU
//! reads; GPU outputs are poisoned with NaN before the launch, so an element the kernel never writes fails;
//! tolerances are stated per row and printed.

#[cfg(feature = "cuda")]
pub mod cuda;

use half::bf16;

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub op: String,
    pub shape: String,
    pub max_abs: f64,
    pub max_rel: f64,
    /// Pass when every element satisfies `|gpu - cpu| <= atol + rtol * |cpu|`.
    pub atol: f64,
    pub rtol: f64,
    pub pass: bool,
    /// Why it failed beyond the numbers (NaN, unwritten element, launch error), or extra facts.
    pub note: String,
}

/// The measured difference of two equally long outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diff {
    pub max_abs: f64,
    /// `max |gpu - cpu| / max(|cpu|, 1e-6)` over elements where `|cpu| >= atol` (small values are judged by
    /// the absolute error alone, so near-zero outputs do not dominate the relative figure).
    pub max_rel: f64,
    /// Elements outside `atol + rtol * |cpu|`, NaN or infinite ones included.
    pub failures: usize,
    /// The first failing index, for the note.
    pub first_failure: Option<usize>,
    pub non_finite: usize,
}

/// Compares `got` (a device output, widened to f32) with the CPU reference `want`.
pub fn diff(got: &[f32], want: &[f32], atol: f64, rtol: f64) -> Diff {
    assert_eq!(got.len(), want.len(), "diff of unequal lengths");
    let mut d = Diff { max_abs: 0.0, max_rel: 0.0, failures: 0, first_failure: None, non_finite: 0 };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let bad = if !g.is_finite() || !w.is_finite() {
            d.non_finite += 1;
            // Both infinite with the same sign is agreement; anything else non-finite is a failure.
            !(g.is_infinite() && g == w)
        } else {
            let e = (g - w).abs();
            d.max_abs = d.max_abs.max(e);
            if w.abs() >= atol {
                d.max_rel = d.max_rel.max(e / w.abs().max(1e-6));
            }
            e > atol + rtol * w.abs()
        };
        if bad {
            d.failures += 1;
            d.first_failure.get_or_insert(i);
        }
    }
    d
}

/// Widens device bf16 output for [`diff`].
pub fn widen(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// The seeded random stream every check draws from (SplitMix64; portable and independent of `rand`'s
/// versions, so a printed seed replays the same inputs).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [-amp, amp).
    pub fn sym(&mut self, amp: f32) -> f32 {
        (self.unit() * 2.0 - 1.0) * amp
    }
    /// `n` bf16 values uniform in `[offset - amp, offset + amp)`.
    pub fn bf16s(&mut self, n: usize, amp: f32, offset: f32) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(offset + self.sym(amp))).collect()
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The whole table, in the order checks ran.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    /// Adds the row for one comparison and returns whether it passed.
    pub fn compare(&mut self, op: &str, shape: &str, got: &[f32], want: &[f32], atol: f64, rtol: f64) -> bool {
        let d = diff(got, want, atol, rtol);
        let pass = d.failures == 0;
        let note = match d.first_failure {
            None => String::new(),
            Some(i) => format!(
                "{} of {} elements out of tolerance ({} non-finite); first at {i}: gpu {} cpu {}",
                d.failures,
                got.len(),
                d.non_finite,
                got[i],
                want[i]
            ),
        };
        self.rows.push(Row {
            op: op.to_string(),
            shape: shape.to_string(),
            max_abs: d.max_abs,
            max_rel: d.max_rel,
            atol,
            rtol,
            pass,
            note,
        });
        pass
    }

    /// Records a check that could not run to a comparison (a launcher or driver error): always a failure.
    pub fn error(&mut self, op: &str, shape: &str, msg: impl std::fmt::Display) {
        self.rows.push(Row {
            op: op.to_string(),
            shape: shape.to_string(),
            max_abs: f64::NAN,
            max_rel: f64::NAN,
            atol: 0.0,
            rtol: 0.0,
            pass: false,
            note: msg.to_string(),
        });
    }

    /// Records a check that expects an error (a launcher refusing a bad shape): passes when `got` is `Err`.
    pub fn expect_err<T, E: std::fmt::Display>(&mut self, op: &str, shape: &str, got: Result<T, E>) {
        let (pass, note) = match got {
            Ok(_) => (false, "accepted a bad shape".to_string()),
            Err(e) => (true, format!("refused: {e}")),
        };
        self.rows.push(Row {
            op: op.to_string(),
            shape: shape.to_string(),
            max_abs: 0.0,
            max_rel: 0.0,
            atol: 0.0,
            rtol: 0.0,
            pass,
            note,
        });
    }

    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.pass).count()
    }

    /// The table as aligned text, one row per check.
    pub fn table(&self) -> String {
        let head = ["op", "shape", "max abs err", "max rel err", "tolerance", "result"];
        let mut cells: Vec<[String; 6]> = vec![head.map(String::from)];
        for r in &self.rows {
            cells.push([
                r.op.clone(),
                r.shape.clone(),
                format!("{:.3e}", r.max_abs),
                format!("{:.3e}", r.max_rel),
                format!("{:.0e}+{:.0e}|x|", r.atol, r.rtol),
                if r.pass { "pass".into() } else { "FAIL".into() },
            ]);
        }
        let widths: Vec<usize> =
            (0..6).map(|c| cells.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for (i, row) in cells.iter().enumerate() {
            let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
            if i == 0 {
                out.push_str(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
                out.push('\n');
            } else if !self.rows[i - 1].note.is_empty() {
                let mark = if self.rows[i - 1].pass { "   " } else { "-> " };
                out.push_str(&format!("    {mark}{}\n", self.rows[i - 1].note));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_catches_nan_and_out_of_tolerance() {
        let want = [1.0, 2.0, 0.0, -4.0];
        assert_eq!(diff(&want, &want, 1e-3, 1e-2).failures, 0);
        let d = diff(&[1.0, f32::NAN, 0.0, -4.0], &want, 1e-3, 1e-2);
        assert_eq!((d.failures, d.non_finite, d.first_failure), (1, 1, Some(1)));
        let d = diff(&[1.0, 2.0, 0.0, -4.1], &want, 1e-3, 1e-2);
        assert_eq!(d.failures, 1);
        assert!((d.max_abs - 0.1).abs() < 1e-5 && (d.max_rel - 0.025).abs() < 1e-5, "{d:?}");
        // Within rtol of a large value passes.
        assert_eq!(diff(&[1.0, 2.0, 0.0, -4.03], &want, 1e-3, 1e-2).failures, 0);
    }

    #[test]
    fn report_counts_failures_and_prints_them() {
        let mut r = Report::default();
        assert!(r.compare("ok_op", "[2]", &[1.0, 2.0], &[1.0, 2.0], 1e-3, 1e-2));
        assert!(!r.compare("bad_op", "[2]", &[1.0, f32::NAN], &[1.0, 2.0], 1e-3, 1e-2));
        r.error("launch_op", "[3]", "launch failed");
        r.expect_err::<(), _>("refuse_op", "[0]", Err("n must be > 0"));
        r.expect_err::<(), String>("accept_op", "[0]", Ok(()));
        assert_eq!(r.failures(), 3);
        let t = r.table();
        assert!(t.contains("bad_op") && t.contains("FAIL") && t.contains("non-finite"), "{t}");
        assert!(t.contains("accepted a bad shape"), "{t}");
    }

    #[test]
    fn rng_is_seeded_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<f32> = (0..1000).map(|_| a.sym(2.0)).collect();
        let ys: Vec<f32> = (0..1000).map(|_| b.sym(2.0)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (-2.0..2.0).contains(x)));
        assert!(xs.iter().any(|x| *x > 1.5) && xs.iter().any(|x| *x < -1.5));
    }
}
