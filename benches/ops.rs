//! Criterion benches of the CPU backend's hot ops at FaceLLM-1B sizes (Qwen2.5-0.5B LLM, InternViT-300M
//! vision). Decode-shaped ops report bytes of weights or KV cache read per second (they are bandwidth
//! bound); prefill and vision ops report "elements" that are floating-point operations (2 per
//! multiply-add), so criterion's elem/s reads as FLOP/s. Record the CPU model with every number.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use facellm::backend;
use facellm::tensor::Tensor;
use half::bf16;

/// Deterministic pseudo-random values in [-scale, scale): benches need no statistics, just no zeros.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn f32t(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    Tensor::from_f32(shape.to_vec(), values(shape.iter().product(), seed, scale)).unwrap()
}

fn bf16t(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let v = values(shape.iter().product(), seed, scale).into_iter().map(bf16::from_f32).collect();
    Tensor::from_bf16(shape.to_vec(), v).unwrap()
}

fn linear(c: &mut Criterion) {
    // (n, k): attention q/o projection, MLP gate/up, MLP down.
    let shapes = [(896, 896), (4864, 896), (896, 4864)];
    let mut g = c.benchmark_group("linear_decode_bf16");
    for &(n, k) in &shapes {
        let w = bf16t(&[n, k], 1, 0.05);
        let x = f32t(&[1, k], 2, 1.0);
        g.throughput(Throughput::Bytes((n * k * 2) as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("m1_{n}x{k}")), |b| {
            b.iter(|| backend::linear(&x, &w, None).unwrap())
        });
    }
    // The LM head (272 MB) does not fit any cache: this one measures memory bandwidth.
    let (n, k) = (151_674, 896);
    let w = bf16t(&[n, k], 1, 0.05);
    let x = f32t(&[1, k], 2, 1.0);
    g.throughput(Throughput::Bytes((n * k * 2) as u64));
    g.bench_function(BenchmarkId::from_parameter(format!("m1_{n}x{k}")), |b| {
        b.iter(|| backend::linear(&x, &w, None).unwrap())
    });
    g.finish();
    let mut g = c.benchmark_group("linear_prefill_bf16");
    for &(n, k) in &shapes {
        let w = bf16t(&[n, k], 1, 0.05);
        let x = f32t(&[512, k], 2, 1.0);
        g.throughput(Throughput::Elements((2 * 512 * n * k) as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("m512_{n}x{k}")), |b| {
            b.iter(|| backend::linear(&x, &w, None).unwrap())
        });
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    let (t, h, d) = (1025, 16, 64);
    let (q, k, v) = (f32t(&[t, h, d], 3, 1.0), f32t(&[t, h, d], 4, 1.0), f32t(&[t, h, d], 5, 1.0));
    g.throughput(Throughput::Elements((4 * t * t * d * h) as u64));
    g.bench_function("vision_1025x16x64", |b| b.iter(|| backend::attention(&q, &k, &v, None, 0.125).unwrap()));
    let (tk, hq, hk) = (512, 14, 2);
    let q = f32t(&[1, hq, d], 6, 1.0);
    let (k, v) = (f32t(&[tk, hk, d], 7, 1.0), f32t(&[tk, hk, d], 8, 1.0));
    g.throughput(Throughput::Bytes((2 * tk * hk * d * 4) as u64));
    g.bench_function("decode_1x512_14q2kv_64", |b| {
        b.iter(|| backend::attention(&q, &k, &v, Some(tk - 1), 0.125).unwrap())
    });
    g.finish();
}

fn elementwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    let x = f32t(&[1025, 4096], 9, 3.0);
    g.throughput(Throughput::Elements(x.numel() as u64));
    g.bench_function("gelu_erf_1025x4096", |b| {
        b.iter_batched(|| x.clone(), |mut t| backend::gelu_erf(&mut t).unwrap(), criterion::BatchSize::LargeInput)
    });
    let x = f32t(&[1025, 1024], 10, 3.0);
    let (w, bias) = (bf16t(&[1024], 11, 1.0), bf16t(&[1024], 12, 1.0));
    g.throughput(Throughput::Bytes((x.numel() * 8) as u64));
    g.bench_function("layer_norm_1025x1024", |b| b.iter(|| backend::layer_norm(&x, &w, &bias, 1e-6).unwrap()));
    g.finish();
}

criterion_group! {
    name = ops;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = linear, attention, elementwise
}
criterion_main!(ops);
