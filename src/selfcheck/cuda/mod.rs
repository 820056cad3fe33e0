//! The GPU side of `selfcheck`: one module per kernel family, each with `run(dev, report, rng)` that adds
//! its rows, then whole-model checks. A check never returns early on a mismatch: it records the row and goes
//! on, so one run shows every failure.

pub mod attention;
pub mod gemm;
pub mod generate;
pub mod kernels;
pub mod llm;
pub mod llm_kernels;
pub mod models;
pub mod norm;

use cudarc::driver::{CudaSlice, DeviceRepr};

use crate::backend::cuda::{buffer, CudaDevice};

use super::{Report, Rng, Row};

/// What a check's body returns: any error becomes a failing row naming it.
pub(crate) type Check = crate::Result<()>;

/// Runs `body`, recording its error (a launcher refusing valid input, a driver failure) as a failing row.
pub(crate) fn check(report: &mut Report, op: &str, shape: &str, body: impl FnOnce(&mut Report) -> Check) {
    if let Err(e) = body(report) {
        report.error(op, shape, e);
    }
}

/// A pass/fail row for a property that is not an elementwise difference.
pub(crate) fn verdict(report: &mut Report, op: &str, shape: &str, pass: bool, note: String) {
    report.rows.push(Row {
        op: op.to_string(),
        shape: shape.to_string(),
        max_abs: 0.0,
        max_rel: 0.0,
        atol: 0.0,
        rtol: 0.0,
        pass,
        note: if pass { String::new() } else { note },
    });
}

pub(crate) fn up<T: DeviceRepr>(dev: &CudaDevice, host: &[T]) -> crate::Result<CudaSlice<T>> {
    Ok(buffer::upload(dev, host)?)
}

pub(crate) fn down<T: DeviceRepr + Clone + Default>(dev: &CudaDevice, buf: &CudaSlice<T>) -> crate::Result<Vec<T>> {
    Ok(buffer::download(dev, buf)?)
}

/// Runs every check whose op name contains `filter` (all when `None`).
pub fn run_all(dev: &CudaDevice, report: &mut Report, seed: u64, filter: Option<&str>) {
    type Check = fn(&CudaDevice, &mut Report, &mut Rng);
    let groups: Vec<(&str, Check)> = vec![
        ("gemm", gemm::run),
        ("norm", norm::run),
        ("attention", attention::run),
        ("kernels", kernels::run),
        ("llm_kernels", llm_kernels::run),
        // Whole models last: they take the longest and depend on every kernel above.
        ("vision_model", models::run),
        ("llm_model", llm::run),
        ("generate", generate::run),
    ];
    for (i, (name, f)) in groups.iter().enumerate() {
        if filter.is_some_and(|flt| !name.contains(flt)) {
            continue;
        }
        let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
        f(dev, report, &mut rng);
    }
}

/// One kernel launch to time in `facellm bench --kernels`: what it moves and computes, and the launch itself
/// (inputs already on the device, so the closure only launches).
pub struct KernelCase<'a> {
    pub op: String,
    pub shape: String,
    /// Bytes read plus bytes written by one launch (for GB/s against the copy bandwidth).
    pub bytes: f64,
    /// Floating-point operations of one launch (0 for memory-bound kernels).
    pub flops: f64,
    pub launch: Box<dyn FnMut() -> crate::backend::cuda::Result<()> + 'a>,
}

/// Every kernel group's bench cases (the GEMMs are listed separately by the bench).
pub fn bench_cases(dev: &CudaDevice) -> crate::backend::cuda::Result<Vec<KernelCase<'_>>> {
    let mut cases = kernels::bench_cases(dev)?;
    cases.extend(norm::bench_cases(dev)?);
    cases.extend(attention::bench_cases(dev)?);
    cases.extend(llm_kernels::bench_cases(dev)?);
    Ok(cases)
}
