//! The paged KV cache against plain references: a contiguous copy of every sequence's keys and values kept
//! by the test, and `backend::attention` on contiguous tensors.
//!
//! Keys and values written for token `t` are a function of the salt and of every token up to `t` (as real
//! ones are), so a block found by prefix, shared by a fork or copied on write must read back exactly what
//! the sequence itself would have written. Pools start NaN-filled and block tables are random permutations,
//! so reading a slot that was never written, or the wrong block, poisons the comparison.

use facellm::backend;
use facellm::kv::{BlockPool, BlockTable, KvLayout};
use facellm::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mixes `x` into `h` (splitmix64 finaliser): the test's own prefix hash, independent of the cache's.
fn mix(h: u64, x: u64) -> u64 {
    let mut z = h ^ x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The keys (`which` 0) or values (1) of layer `layer` for tokens `from..to` of a sequence with `tokens`
/// and `salt`: `[to - from, kv_heads, head_dim]` values in [-1, 1).
fn kv_values(l: &KvLayout, salt: u64, tokens: &[u32], from: usize, to: usize, layer: usize, which: u64) -> Vec<f32> {
    let mut h = salt;
    let mut out = Vec::with_capacity((to - from) * l.row());
    for (pos, &tok) in tokens[..to].iter().enumerate() {
        h = mix(h, tok as u64);
        if pos >= from {
            for e in 0..l.row() {
                let r = mix(h, ((layer as u64) << 40) ^ (which << 32) ^ e as u64);
                out.push((r >> 40) as f32 / (1u64 << 23) as f32 - 1.0);
            }
        }
    }
    out
}

/// Writes the k/v of positions `range` of `table` (whose tokens are `tokens`) for every layer.
fn write(pool: &mut BlockPool, table: &BlockTable, tokens: &[u32], range: std::ops::Range<usize>) {
    let l = *pool.layout();
    let shape = [range.len(), l.kv_heads, l.head_dim];
    for layer in 0..l.layers {
        let k = kv_values(&l, table.salt(), tokens, range.start, range.end, layer, 0);
        let v = kv_values(&l, table.salt(), tokens, range.start, range.end, layer, 1);
        let (k, v) = (Tensor::from_f32(shape, k).expect("k"), Tensor::from_f32(shape, v).expect("v"));
        let mut kv = pool.layer_mut(layer).expect("layer");
        backend::write_kv(&mut kv, table.blocks(), range.start, &k, &v).expect("write_kv");
    }
}

/// Reads back every layer of `table` and compares it with what its tokens should have produced.
fn check_contents(pool: &BlockPool, table: &BlockTable, tokens: &[u32], what: &str) {
    let l = *pool.layout();
    assert_eq!(table.len(), tokens.len(), "{what}: length");
    for layer in 0..l.layers {
        let kv = pool.layer(layer).expect("layer");
        let (k, v) = backend::cpu::paged_attention::gather_kv(&kv, table.blocks(), table.len()).expect("gather");
        for (which, got) in [(0, &k), (1, &v)] {
            let want = kv_values(&l, table.salt(), tokens, 0, tokens.len(), layer, which);
            let got = got.f32s().expect("f32");
            if let Some(i) = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                panic!(
                    "{what}: layer {layer} {} differs first at token {}, element {}: got {}, want {} \
                     (table {:?}, len {})",
                    ["k", "v"][which as usize],
                    i / l.row(),
                    i % l.row(),
                    got[i],
                    want[i],
                    table.blocks(),
                    table.len()
                );
            }
        }
    }
}

struct Seq {
    table: BlockTable,
    tokens: Vec<u32>,
}

/// Thousands of random operations on a small pool; after each one the pool's counts must match the tables,
/// and periodically every sequence must read back its own keys and values.
#[test]
fn random_operations_never_leak_or_corrupt() {
    for (seed, block_size, num_blocks) in [(1u64, 4usize, 48usize), (2, 16, 40), (3, 1, 64), (4, 5, 24)] {
        let layout = KvLayout::new(2, 2, 3, block_size).expect("layout");
        let mut pool = BlockPool::with_fill(layout, num_blocks, f32::NAN).expect("pool");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut seqs: Vec<Seq> = Vec::new();
        let (mut exhausted, mut prefix_hits, mut forks) = (0, 0, 0);
        // A tiny vocabulary and shared prompt stems make prefix hits and identical blocks common.
        let stems: Vec<Vec<u32>> = (0..3)
            .map(|_| (0..rng.random_range(1..3 * block_size + 3)).map(|_| rng.random_range(0..4)).collect())
            .collect();
        for step in 0..3000 {
            let what = format!("seed {seed}, block {block_size}, step {step}");
            match rng.random_range(0..100) {
                // New sequence: reuse a cached prefix, then append the rest of its prompt.
                0..=19 if seqs.len() < 12 => {
                    let mut tokens = stems[rng.random_range(0..stems.len())].clone();
                    tokens.extend((0..rng.random_range(0..6)).map(|_| rng.random_range(0..4)));
                    let salt = rng.random_range(0..2);
                    let mut table = BlockTable::new(salt);
                    let matched = pool.match_prefix(&mut table, &tokens).expect("match_prefix");
                    assert!(matched < tokens.len() && matched.is_multiple_of(block_size), "{what}: matched {matched}");
                    prefix_hits += usize::from(matched > 0);
                    let mut seq = Seq { table, tokens: tokens[..matched].to_vec() };
                    match pool.append(&mut seq.table, &tokens[matched..]) {
                        Ok(r) => {
                            seq.tokens.extend_from_slice(&tokens[matched..]);
                            write(&mut pool, &seq.table, &seq.tokens, r);
                            pool.publish(&mut seq.table).expect("publish");
                            seqs.push(seq);
                        }
                        Err(_) => {
                            exhausted += 1;
                            pool.free(&mut seq.table).expect("free");
                        }
                    }
                }
                0..=29 if !seqs.is_empty() => {
                    let i = rng.random_range(0..seqs.len());
                    let table = pool.fork(&seqs[i].table).expect("fork");
                    let tokens = seqs[i].tokens.clone();
                    seqs.push(Seq { table, tokens });
                    forks += 1;
                }
                30..=74 if !seqs.is_empty() => {
                    let i = rng.random_range(0..seqs.len());
                    let n = rng.random_range(0..2 * block_size + 2);
                    let new: Vec<u32> = (0..n).map(|_| rng.random_range(0..4)).collect();
                    let s = &mut seqs[i];
                    let (blocks, len, need) =
                        (s.table.blocks().to_vec(), s.table.len(), pool.blocks_needed(&s.table, n));
                    match pool.append(&mut s.table, &new) {
                        Ok(r) => {
                            assert!(need <= pool.blocks_free() + need, "{what}");
                            s.tokens.extend_from_slice(&new);
                            write(&mut pool, &s.table, &s.tokens, r);
                            if rng.random_bool(0.7) {
                                pool.publish(&mut s.table).expect("publish");
                            }
                        }
                        Err(_) => {
                            exhausted += 1;
                            assert!(need > pool.blocks_free(), "{what}: append failed with {need} needed");
                            assert_eq!(
                                (s.table.blocks(), s.table.len()),
                                (&blocks[..], len),
                                "{what}: failed append changed the table"
                            );
                        }
                    }
                }
                75..=84 if !seqs.is_empty() => {
                    let i = rng.random_range(0..seqs.len());
                    let s = &mut seqs[i];
                    let len = rng.random_range(0..=s.tokens.len());
                    pool.truncate(&mut s.table, len).expect("truncate");
                    s.tokens.truncate(len);
                }
                _ if !seqs.is_empty() => {
                    let mut s = seqs.swap_remove(rng.random_range(0..seqs.len()));
                    pool.free(&mut s.table).expect("free");
                    // A second free of the same table is a no-op, never a double release.
                    pool.free(&mut s.table).expect("free again");
                }
                _ => {}
            }
            if let Err(e) = pool.audit(seqs.iter().map(|s| &s.table)) {
                panic!("{what}: {e}");
            }
            assert_eq!(pool.blocks_free() + pool.blocks_used(), num_blocks, "{what}");
            if step % 50 == 0 {
                for (i, s) in seqs.iter().enumerate() {
                    check_contents(&pool, &s.table, &s.tokens, &format!("{what}, seq {i}"));
                }
            }
        }
        for s in &seqs {
            check_contents(&pool, &s.table, &s.tokens, &format!("seed {seed} at the end"));
        }
        for s in &mut seqs {
            pool.free(&mut s.table).expect("free");
        }
        assert_eq!(pool.blocks_free(), num_blocks, "seed {seed}: leaked blocks");
        assert!((0..num_blocks as u32).all(|b| pool.refcount(b) == 0), "seed {seed}: counts left");
        assert_eq!(pool.prefix_entries(), 0, "seed {seed}: prefix entries outlive their blocks");
        pool.audit([]).expect("audit of the empty pool");
        // The run must have exercised what it claims to test.
        assert!(exhausted > 0 && prefix_hits > 0 && forks > 0, "seed {seed}: {exhausted} {prefix_hits} {forks}");
    }
}

/// The common case: one face image (salt), several questions. Forked and prefix-matched sequences share the
/// prompt's full blocks, copy the partial one on write, and each reads its own tokens after divergence.
#[test]
fn shared_prefix_reads_correctly_after_divergence() {
    let layout = KvLayout::new(3, 2, 8, 16).expect("layout");
    let mut pool = BlockPool::with_fill(layout, 32, f32::NAN).expect("pool");
    let image = 0xface_u64;
    let prompt: Vec<u32> = (0..40).map(|i| 1000 + i).collect();

    let mut a = BlockTable::new(image);
    let r = pool.append(&mut a, &prompt).expect("append");
    write(&mut pool, &a, &prompt, r);
    pool.publish(&mut a).expect("publish");
    assert_eq!(pool.blocks_used(), 3);

    let mut b = pool.fork(&a).expect("fork");
    assert_eq!(a.blocks(), b.blocks());
    assert_eq!(pool.blocks_used(), 3, "a fork copies nothing");

    let (mut ta, mut tb) = (prompt.clone(), prompt.clone());
    let xa: Vec<u32> = (0..5).map(|i| 7 + i).collect();
    let xb: Vec<u32> = (0..30).map(|i| 500 + i).collect();
    let r = pool.append(&mut a, &xa).expect("append a");
    ta.extend_from_slice(&xa);
    write(&mut pool, &a, &ta, r);
    let r = pool.append(&mut b, &xb).expect("append b");
    tb.extend_from_slice(&xb);
    write(&mut pool, &b, &tb, r);
    pool.publish(&mut a).expect("publish a");
    pool.publish(&mut b).expect("publish b");

    assert_eq!(a.blocks()[..2], b.blocks()[..2], "full prompt blocks stay shared");
    assert_ne!(a.blocks()[2], b.blocks()[2], "the shared partial block was copied on write");
    check_contents(&pool, &a, &ta, "a");
    check_contents(&pool, &b, &tb, "b");

    // A later question about the same image finds the two full prompt blocks by content.
    let mut c = BlockTable::new(image);
    let mut tc = prompt.clone();
    tc.extend_from_slice(&[9, 9, 9]);
    assert_eq!(pool.match_prefix(&mut c, &tc).expect("match"), 32);
    assert_eq!(c.blocks()[..2], a.blocks()[..2]);
    let r = pool.append(&mut c, &tc[32..]).expect("append c");
    write(&mut pool, &c, &tc, r);
    check_contents(&pool, &c, &tc, "c");
    check_contents(&pool, &a, &ta, "a after c");
    check_contents(&pool, &b, &tb, "b after c");

    // Same tokens, another image: nothing is shared.
    let mut d = BlockTable::new(image + 1);
    assert_eq!(pool.match_prefix(&mut d, &tc).expect("match"), 0);
    // A whole-prompt hit still leaves one token to run, for its logits.
    let mut e = BlockTable::new(image);
    assert_eq!(pool.match_prefix(&mut e, &prompt[..32]).expect("match"), 16);
    assert!(pool.match_prefix(&mut e, &prompt).is_err(), "match_prefix needs an empty table");

    // A published block rewritten in place after a truncate must no longer be found under its old tokens.
    let mut f = BlockTable::new(77);
    let r = pool.append(&mut f, &prompt[..32]).expect("append f");
    write(&mut pool, &f, &prompt[..32], r);
    pool.publish(&mut f).expect("publish f");
    pool.truncate(&mut f, 20).expect("truncate f");
    let mut tf = prompt[..20].to_vec();
    tf.extend_from_slice(&[3; 12]);
    let r = pool.append(&mut f, &tf[20..]).expect("append f");
    write(&mut pool, &f, &tf, r);
    let mut g = BlockTable::new(77);
    assert_eq!(pool.match_prefix(&mut g, &prompt).expect("match"), 16, "stale block found by prefix");
    let r = pool.append(&mut g, &prompt[16..]).expect("append g");
    write(&mut pool, &g, &prompt, r);
    check_contents(&pool, &f, &tf, "f");
    check_contents(&pool, &g, &prompt, "g");

    pool.audit([&a, &b, &c, &d, &e, &f, &g]).expect("audit");
    for t in [&mut a, &mut b, &mut c, &mut d, &mut e, &mut f, &mut g] {
        pool.free(t).expect("free");
    }
    assert_eq!((pool.blocks_used(), pool.prefix_entries()), (0, 0));
}

#[test]
fn exhaustion_and_bad_tables_are_errors() {
    let layout = KvLayout::new(1, 1, 4, 4).expect("layout");
    let mut pool = BlockPool::new(layout, 2).expect("pool");
    let mut a = BlockTable::new(0);
    pool.append(&mut a, &[1, 2, 3, 4, 5]).expect("two blocks fit");
    let mut b = pool.fork(&a).expect("fork");
    // b's partial block is shared: appending needs a copy, and there is no free block.
    let err = pool.append(&mut b, &[6]).expect_err("exhausted");
    assert!(err.to_string().contains("out of blocks"), "{err}");
    assert_eq!((b.len(), b.blocks()), (5, a.blocks()), "failed append left the table as it was");
    assert!(pool.append(&mut a, &[1; 4]).is_err());
    assert!(pool.truncate(&mut a, 6).is_err());
    pool.free(&mut b).expect("free");
    assert!(BlockPool::new(layout, 0).is_err());
    assert!(pool.layer(1).is_err());

    // Tables too short or naming blocks outside the pool.
    let q = Tensor::zeros([1, 2, 4]);
    let kv = pool.layer(0).expect("layer");
    assert!(backend::paged_attention(&q, &kv, &[0], 5, Some(4), 0.5).is_err(), "5 tokens need 2 blocks");
    assert!(backend::paged_attention(&q, &kv, &[0, 7], 5, Some(4), 0.5).is_err(), "block 7 is out of range");
    let k = Tensor::zeros([2, 1, 4]);
    let mut kvm = pool.layer_mut(0).expect("layer");
    assert!(backend::write_kv(&mut kvm, &[0], 3, &k, &k).is_err(), "positions 3..5 need 2 blocks");
    assert!(backend::write_kv(&mut kvm, &[0, 1], 3, &k, &Tensor::zeros([2, 2, 2])).is_err());
}

/// Standard normal values (Box-Muller) times `scale`.
fn normal(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(1e-12..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * scale
        })
        .collect()
}

/// `paged_attention` on random non-contiguous tables in a NaN-poisoned pool against `attention` on the
/// contiguous keys and values, for decode, prefill and chunked prefill.
#[test]
fn paged_attention_matches_contiguous() {
    let mut seed = 100;
    for (hq, hk) in [(14usize, 2usize), (8, 2)] {
        for d in [64usize, 128] {
            for len in [1usize, 15, 16, 17, 99] {
                seed += 1;
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let bs = 16;
                let layout = KvLayout::new(1, hk, d, bs).expect("layout");
                let need = len.div_ceil(bs);
                let num_blocks = 2 * need + 3;
                let mut pool = BlockPool::with_fill(layout, num_blocks, f32::NAN).expect("pool");
                // A random permutation's head: blocks in no particular order, never adjacent by design.
                let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
                for i in (1..ids.len()).rev() {
                    ids.swap(i, rng.random_range(0..=i));
                }
                let table = &ids[..need];
                let k = normal(&mut rng, len * hk * d, 1.0);
                let v = normal(&mut rng, len * hk * d, 1.0);
                // Written in random chunks so that writes start and end inside blocks.
                let mut pos = 0;
                while pos < len {
                    let n = rng.random_range(1..=len - pos);
                    let kc = Tensor::from_f32([n, hk, d], k[pos * hk * d..(pos + n) * hk * d].to_vec()).expect("k");
                    let vc = Tensor::from_f32([n, hk, d], v[pos * hk * d..(pos + n) * hk * d].to_vec()).expect("v");
                    let mut kv = pool.layer_mut(0).expect("layer");
                    backend::write_kv(&mut kv, table, pos, &kc, &vc).expect("write_kv");
                    pos += n;
                }
                let kt = Tensor::from_f32([len, hk, d], k).expect("k");
                let vt = Tensor::from_f32([len, hk, d], v).expect("v");
                let scale = (d as f32).powf(-0.5);
                let chunk = len.div_ceil(3);
                // (queries, causal offset): decode, whole prefill, the last chunk of a chunked prefill, and
                // bidirectional attention over the cache.
                for (tq, causal) in [(1, Some(len - 1)), (len, Some(0)), (chunk, Some(len - chunk)), (len.min(5), None)]
                {
                    let q = Tensor::from_f32([tq, hq, d], normal(&mut rng, tq * hq * d, 1.0)).expect("q");
                    let want = backend::attention(&q, &kt, &vt, causal, scale).expect("attention");
                    let kv = pool.layer(0).expect("layer");
                    let got = backend::paged_attention(&q, &kv, table, len, causal, scale).expect("paged");
                    assert_eq!(got.shape(), want.shape());
                    let (g, w) = (got.f32s().expect("f32"), want.f32s().expect("f32"));
                    let mut worst = (0.0f32, 0usize);
                    for i in 0..w.len() {
                        let e = (g[i] - w[i]).abs();
                        // NaN (a stray read of a poisoned slot) must fail: it counts as infinitely wrong.
                        let e = if e.is_nan() { f32::INFINITY } else { e };
                        if e > worst.0 {
                            worst = (e, i);
                        }
                    }
                    // Both sides run the same f32 arithmetic on the same values, so the results agree to
                    // rounding of a handful of ulps at most (measured: exactly equal).
                    assert!(
                        worst.0 <= 1e-6,
                        "hq {hq} hk {hk} d {d} len {len} tq {tq} causal {causal:?} seed {seed}: max abs error \
                         {} at index {} (token {}, head {}); table {table:?}",
                        worst.0,
                        worst.1,
                        worst.1 / (hq * d),
                        worst.1 / d % hq
                    );
                }
            }
        }
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.f32s().expect("f32"), b.f32s().expect("f32"));
    // NaN counts as infinitely wrong.
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) })
}

/// The demo model's decoder on the paged cache against its default contiguous cache: a prefill, decode
/// steps, then a second question that reuses the first prompt's full blocks by prefix.
#[test]
fn qwen2_on_the_paged_cache_matches_the_contiguous_cache() {
    use facellm::config::ModelConfig;
    use facellm::kv::PagedKv;
    use facellm::model::random::{demo_config_json, RandomWeights};

    let config = ModelConfig::from_json_str("demo config", &demo_config_json()).expect("config");
    let model = facellm::model::build(&config, &RandomWeights::for_config(&config, "kv-paged")).expect("model");
    let llm = model.llm();
    let p = llm.params();
    let layout = KvLayout::new(p.layers, p.kv_heads, p.head_dim, 16).expect("layout");
    let mut pool = BlockPool::with_fill(layout, 16, f32::NAN).expect("pool");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let prompt: Vec<u32> = (0..37).map(|_| rng.random_range(0..5000)).collect();
    let decode: Vec<u32> = (0..3).map(|_| rng.random_range(0..5000)).collect();

    let mut cache = model.new_cache();
    let mut table = BlockTable::new(0);
    let mut steps: Vec<&[u32]> = vec![&prompt];
    steps.extend(decode.chunks(1));
    for (s, ids) in steps.iter().enumerate() {
        let want = llm.forward(llm.embed(ids).expect("embed"), &mut cache, None).expect("contiguous");
        let mut kv = PagedKv::new(&mut pool, &mut table, ids);
        let got = llm.forward_kv(llm.embed(ids).expect("embed"), &mut kv, None).expect("paged");
        let err = max_abs_diff(&got, &want);
        // The paged op gathers and runs the same attention, so this is exact (measured 0).
        assert!(err <= 1e-6, "step {s}: hidden states differ by {err}");
    }
    assert_eq!(table.len(), prompt.len() + decode.len());

    // A second question with the same 32-token start reuses two blocks and runs only the rest.
    let mut second = prompt[..32].to_vec();
    second.extend_from_slice(&[11, 12, 13]);
    let mut reuse = BlockTable::new(0);
    let matched = pool.match_prefix(&mut reuse, &second).expect("match");
    assert_eq!(matched, 32);
    let rest = &second[matched..];
    let got = {
        let mut kv = PagedKv::new(&mut pool, &mut reuse, rest);
        llm.forward_kv(llm.embed(rest).expect("embed"), &mut kv, None).expect("paged")
    };
    let mut fresh = model.new_cache();
    let full = llm.forward(llm.embed(&second).expect("embed"), &mut fresh, None).expect("contiguous");
    let d = p.hidden;
    let tail = Tensor::from_f32([rest.len(), d], full.f32s().expect("f32")[matched * d..].to_vec()).expect("tail");
    let err = max_abs_diff(&got, &tail);
    // Prefill of 35 tokens versus 3 on top of a cache: different GEMM blockings, so allow f32 rounding
    // (hidden states are O(1); measured 1.9e-6).
    assert!(err <= 1e-4, "prefix-reused hidden states differ by {err}");

    pool.audit([&table, &reuse]).expect("audit");
    pool.free(&mut table).expect("free");
    pool.free(&mut reuse).expect("free");
    assert_eq!(pool.blocks_used(), 0);
}

/// A pass that fails before `commit` leaves the table and the pool as they were.
#[test]
fn uncommitted_pass_rolls_back() {
    use facellm::kv::PagedKv;
    use facellm::model::llm::KvStore;

    let layout = KvLayout::new(1, 1, 4, 4).expect("layout");
    let mut pool = BlockPool::new(layout, 4).expect("pool");
    let mut table = BlockTable::new(0);
    pool.append(&mut table, &[1, 2, 3]).expect("append");
    {
        let mut kv = PagedKv::new(&mut pool, &mut table, &[4, 5, 6]);
        assert!(kv.reserve(2).is_err(), "token ids must match the pass");
        kv.reserve(3).expect("reserve");
        assert_eq!(kv.held(), 3);
    }
    assert_eq!((table.len(), table.blocks().len(), pool.blocks_used()), (3, 1, 1));
    pool.audit([&table]).expect("audit");
}
