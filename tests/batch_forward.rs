//! `forward_batch` against one sequence at a time. Several sequences of different lengths run through
//! batched passes over one paged pool (prefills of mixed lengths, chunked prefill, decode steps sharing a
//! pass with a late sequence's prefill); each must get the logits it gets alone.
//!
//! Two modes, two standards:
//! - plain (`row_invariant = false`): compared with the sequence alone on a contiguous cache, prompt in one
//!   pass (what `generate` does). The GEMM path (more than 32 rows) and attention's GEMM path round
//!   differently from the GEMV and small-query paths, so rows agree to rounding: tolerance 1e-4 absolute on
//!   logits of magnitude ~10 (measured: ~2e-5, printed).
//! - row-invariant (what the server runs): compared with the sequence alone through the same batched
//!   forward, prompt in one pass, and required to be bit for bit equal, whatever the chunking and the
//!   other sequences of each pass.

use facellm::kv::{BlockPool, BlockTable, KvLayout, PagedBatch};
use facellm::model::facellm::{BatchInput, FaceLlm};
use facellm::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL: f32 = 1e-4;
const DECODE_STEPS: usize = 6;

struct Seq {
    /// Prompt then the tokens fed by the decode steps.
    ids: Vec<u32>,
    prompt_len: usize,
    features: Option<Tensor>,
    /// Prefill chunk of the batched schedule.
    chunk: usize,
    /// Step at which the sequence joins the batched schedule.
    joins: usize,
}

fn model() -> (tempfile::TempDir, FaceLlm) {
    let dir = tempfile::tempdir().expect("tempdir");
    facellm::model::random::write_demo_model(dir.path(), "batch-forward").expect("demo model");
    let (_, m) = facellm::model::load_dir(dir.path()).expect("load");
    (dir, m)
}

/// (prompt length, image rows, prefill chunk, join step): sizes on both sides of the GEMV/GEMM switch (32
/// rows) and of attention's small-query path (4 rows), a prompt with 256 image feature rows, chunked
/// prefills, and a sequence that joins while the others decode.
fn sequences(m: &FaceLlm) -> Vec<Seq> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let d = m.llm().params().hidden;
    [(1, 0, 1, 0), (5, 0, 5, 0), (19, 0, 7, 0), (40, 0, 40, 0), (300, 256, 128, 0), (99, 0, 33, 2)]
        .into_iter()
        .map(|(n, img, chunk, joins)| {
            let mut ids: Vec<u32> = (0..n + DECODE_STEPS).map(|_| rng.random_range(0..150_000)).collect();
            let features = (img > 0).then(|| {
                ids[3..3 + img].fill(m.image_token_id());
                let f: Vec<f32> = (0..img * d).map(|_| rng.random_range(-1.0..1.0)).collect();
                Tensor::from_f32([img, d], f).expect("features")
            });
            Seq { ids, prompt_len: n, features, chunk, joins }
        })
        .collect()
}

/// The feature rows of the image tokens among `s.ids[from..to]`.
fn rows(m: &FaceLlm, s: &Seq, from: usize, to: usize) -> Option<Tensor> {
    let f = s.features.as_ref()?;
    let img = m.image_token_id();
    let before = s.ids[..from].iter().filter(|&&t| t == img).count();
    let here = s.ids[from..to].iter().filter(|&&t| t == img).count();
    let d = f.shape()[1];
    (here > 0).then(|| {
        Tensor::from_f32([here, d], f.f32s().expect("f32")[before * d..(before + here) * d].to_vec()).expect("rows")
    })
}

/// Runs the sequences through batched passes: each step, every sequence that has joined runs its next
/// prefill chunk (`whole`: the whole prompt) or its next decode token. Returns, per sequence, the logits
/// after its prompt and after each decode token but the last.
fn batched(m: &FaceLlm, seqs: &[&Seq], row_invariant: bool, whole: bool) -> Vec<Vec<Vec<f32>>> {
    let p = m.llm().params();
    let layout = KvLayout::new(p.layers, p.kv_heads, p.head_dim, 16).expect("layout");
    let mut pool = BlockPool::with_fill(layout, 256, f32::NAN).expect("pool");
    let mut tables: Vec<BlockTable> = (0..seqs.len()).map(|i| BlockTable::new(i as u64)).collect();
    let mut out = vec![Vec::new(); seqs.len()];
    for step in 0.. {
        let plan: Vec<(usize, usize, usize)> = seqs
            .iter()
            .enumerate()
            .filter(|(i, s)| whole || step >= s.joins || !tables[*i].is_empty())
            .filter(|(i, s)| tables[*i].len() + 1 < s.ids.len())
            .map(|(i, s)| {
                let held = tables[i].len();
                let chunk = if whole { s.prompt_len } else { s.chunk };
                (i, held, if held < s.prompt_len { chunk.min(s.prompt_len - held) } else { 1 })
            })
            .collect();
        if plan.is_empty() {
            assert!(step > 0);
            break;
        }
        let feats: Vec<Option<Tensor>> =
            plan.iter().map(|&(i, held, len)| rows(m, seqs[i], held, held + len)).collect();
        let inputs: Vec<BatchInput> = plan
            .iter()
            .zip(&feats)
            .map(|(&(i, held, len), f)| BatchInput {
                ids: &seqs[i].ids[held..held + len],
                features: f.as_ref(),
                logits: held + len >= seqs[i].prompt_len,
                greedy: false,
            })
            .collect();
        let mut slots: Vec<Option<&mut BlockTable>> = tables.iter_mut().map(Some).collect();
        let kv_seqs = plan
            .iter()
            .map(|&(i, held, len)| (slots[i].take().expect("once per pass"), &seqs[i].ids[held..held + len]))
            .collect();
        let mut kv = PagedBatch::new(&mut pool, kv_seqs, row_invariant);
        let logits = m.forward_batch(&inputs, &mut kv, row_invariant).expect("forward_batch");
        drop(kv);
        let mut r = 0;
        for (&(i, ..), input) in plan.iter().zip(&inputs) {
            if input.logits {
                let l = logits.as_ref().expect("logits").f32s().expect("f32");
                out[i].push(l[r * p.vocab..(r + 1) * p.vocab].to_vec());
                r += 1;
            }
        }
    }
    for (t, s) in tables.iter().zip(seqs) {
        assert_eq!(t.len(), s.ids.len() - 1, "every token but the last ran");
    }
    pool.audit(&tables).expect("pool audit");
    out
}

/// The sequence alone on a contiguous cache: prompt in one pass, then one token per pass (as `generate`).
fn alone_contiguous(m: &FaceLlm, s: &Seq) -> Vec<Vec<f32>> {
    let mut cache = m.new_cache();
    let mut out = Vec::new();
    let l = m.forward(&s.ids[..s.prompt_len], s.features.as_ref(), &mut cache, false, None).expect("prefill");
    out.push(l.f32s().expect("f32").to_vec());
    for &id in &s.ids[s.prompt_len..s.ids.len() - 1] {
        out.push(m.forward(&[id], None, &mut cache, false, None).expect("decode").f32s().expect("f32").to_vec());
    }
    out
}

/// Largest |a - b| and where; whether every value is bitwise equal.
fn diff(a: &[f32], b: &[f32]) -> (f32, usize, bool) {
    assert_eq!(a.len(), b.len(), "vocab");
    let mut worst = (0.0f32, 0);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let e = (x - y).abs();
        if e > worst.0 || e.is_nan() {
            worst = (e, i);
        }
    }
    (worst.0, worst.1, a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()))
}

#[test]
fn batched_logits_equal_one_by_one() {
    let (_dir, m) = model();
    let seqs = sequences(&m);
    let all: Vec<&Seq> = seqs.iter().collect();

    let plain = batched(&m, &all, false, false);
    let mut max_abs = 0.0f32;
    let mut rows = 0;
    for (i, s) in seqs.iter().enumerate() {
        let want = alone_contiguous(&m, s);
        assert_eq!(plain[i].len(), want.len(), "sequence {i}: logit rows");
        for (pos, (got, want)) in plain[i].iter().zip(&want).enumerate() {
            let (err, at, _) = diff(got, want);
            assert!(
                err <= TOL,
                "plain: sequence {i} (prompt {}, chunk {}) row {pos}: |batched - alone| = {err:e} at logit {at} \
                 ({} vs {})",
                s.prompt_len,
                s.chunk,
                got[at],
                want[at]
            );
            max_abs = max_abs.max(err);
            rows += 1;
        }
    }
    println!("plain mode: {rows} logit rows, max |batched - alone| = {max_abs:e} (tolerance {TOL:e})");

    let invariant = batched(&m, &all, true, false);
    for (i, s) in seqs.iter().enumerate() {
        let alone = batched(&m, &[s], true, true);
        assert_eq!(invariant[i].len(), alone[0].len(), "sequence {i}: logit rows");
        for (pos, (got, want)) in invariant[i].iter().zip(&alone[0]).enumerate() {
            let (err, at, same) = diff(got, want);
            assert!(
                same,
                "row-invariant: sequence {i} (prompt {}, chunk {}) row {pos} differs from the sequence alone: \
                 {err:e} at logit {at} ({} vs {})",
                s.prompt_len, s.chunk, got[at], want[at]
            );
        }
    }
    println!("row-invariant mode: every logit row bitwise equal to the sequence alone");
}
