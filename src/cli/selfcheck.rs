//! `facellm selfcheck --device cuda`: every CUDA kernel and cuBLAS GEMM against its CPU twin on fresh
//! random inputs, then the vision tower + projector of tiny and real-size random models on both devices;
//! prints one table and exits non-zero on any failure, or when there is no GPU to check.
//!
//!   facellm selfcheck --device cuda
//!   facellm selfcheck --device cuda --only attention --seed 42

use super::common::Device;

#[derive(clap::Args)]
pub struct Args {
    /// The device to check: cuda (the CPU backend is the reference, it has nothing to check against).
    #[arg(long, value_enum, default_value_t = Device::Cuda)]
    device: Device,
    /// Seed of the random inputs (printed, so a failure can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// Only the check groups whose name contains this (gemm, kernels, attention, llm_kernels, models).
    #[arg(long)]
    only: Option<String>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if matches!(args.device, Device::Cpu) {
        anyhow::bail!("selfcheck compares the CUDA backend with the CPU backend; run it with --device cuda");
    }
    run_cuda(args)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!(
        "selfcheck: this build of facellm has no CUDA backend, so there is nothing to check \
         (build with `cargo build --release --features cuda`)"
    )
}

#[cfg(feature = "cuda")]
fn run_cuda(args: Args) -> anyhow::Result<()> {
    use facellm::backend::cuda::{registry::Image, CudaDevice};
    use facellm::selfcheck::Report;

    let dev = CudaDevice::new(args.gpu).map_err(|e| anyhow::anyhow!("selfcheck: no GPU to check: {e}"))?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let (major, minor) = dev.info.compute_capability;
    let image = match dev.kernels.image_of("rmsnorm") {
        Some(Image::Sm90aCubin) => "sm_90a cubins",
        Some(Image::Sm80Ptx) => "sm_80 PTX (JIT)",
        None => "none",
    };
    println!(
        "facellm selfcheck: {} (sm_{major}{minor}, device {} of {}), kernels from {image}, seed {seed}",
        dev.info.name, dev.info.ordinal, dev.info.count
    );
    let mut report = Report::default();
    let started = std::time::Instant::now();
    facellm::selfcheck::cuda::run_all(&dev, &mut report, seed, args.only.as_deref());
    print!("{}", report.table());
    let failed = report.failures();
    println!(
        "{} checks, {} passed, {failed} failed, {:.1} s (replay with --seed {seed})",
        report.rows.len(),
        report.rows.len() - failed,
        started.elapsed().as_secs_f64()
    );
    if report.rows.is_empty() {
        anyhow::bail!("selfcheck ran no checks (--only {:?} matched nothing)", args.only);
    }
    if failed > 0 {
        anyhow::bail!("selfcheck: {failed} of {} checks failed", report.rows.len());
    }
    Ok(())
}
