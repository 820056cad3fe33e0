//! Without feature `cuda` this does nothing. With it, every `kernels/*.cu` is compiled by nvcc to sm_80 PTX
//! and an sm_90a cubin in OUT_DIR, and `$OUT_DIR/kernels_index.rs` embeds them for `backend::cuda::registry`.
//! No GPU, driver or nvidia-smi is needed; any nvcc error fails the build with nvcc's full output. Kept free
//! of build-dependencies so the default build pays nothing for it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// The pinned wheels' nvcc, where `tools/install_nvcc.sh` puts it.
const LOCAL_NVCC: &str = ".cuda/nvidia/cu13/bin/nvcc";

/// No `--use_fast_math`: exp/erf/division must stay IEEE-precise to match the CPU twins.
const COMMON_FLAGS: &[&str] = &["-std=c++17", "-O3", "-lineinfo", "-Xptxas", "-v"];

struct Target {
    suffix: &'static str,
    flags: &'static [&'static str],
}

const TARGETS: &[Target] = &[
    Target { suffix: "sm80.ptx", flags: &["-arch=sm_80", "--ptx"] },
    Target { suffix: "sm90a.cubin", flags: &["-gencode=arch=compute_90a,code=sm_90a", "-cubin"] },
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");

    let root = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env("OUT_DIR"));
    // Cargo reruns a build script every time for a missing rerun-if-changed path, so name it only once installed.
    if root.join(LOCAL_NVCC).is_file() {
        println!("cargo:rerun-if-changed={LOCAL_NVCC}");
    }
    let nvcc = find_nvcc(&root);
    let include_flags = include_flags(&nvcc);

    let kernels_dir = root.join("kernels");
    let mut sources: Vec<PathBuf> =
        read_dir(&kernels_dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "cu")).collect();
    sources.sort();
    let headers: Vec<PathBuf> = read_dir(&kernels_dir.join("common"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cuh"))
        .collect();
    let newest_header = headers.iter().map(|h| mtime(h)).max().unwrap_or(SystemTime::UNIX_EPOCH);

    // A different nvcc or different flags invalidate every image, whatever the timestamps say.
    let stamp_path = out.join("kernels.stamp");
    let stamp = format!("{}\n{:?}\n{:?}\n", nvcc.display(), COMMON_FLAGS, include_flags);
    let stamp_ok = std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp);

    let mut jobs = Vec::new();
    for src in &sources {
        let stem = stem(src);
        let newest_input = mtime(src).max(newest_header);
        for t in TARGETS {
            let img = out.join(format!("{stem}.{}", t.suffix));
            let fresh = stamp_ok && img.exists() && mtime(&img) > newest_input;
            if !fresh {
                jobs.push((src.clone(), img, t));
            }
        }
    }

    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(4, |n| n.get()).min(jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((src, img, t)) = jobs.get(i) else { break };
                if let Err(e) = compile(&nvcc, &include_flags, src, img, t) {
                    errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    if !errors.is_empty() {
        let _ = std::fs::remove_file(&stamp_path);
        panic!("nvcc failed ({} of {} compiles):\n\n{}", errors.len(), jobs.len(), errors.join("\n\n"));
    }
    if let Err(e) = std::fs::write(&stamp_path, &stamp) {
        panic!("cannot write {}: {e}", stamp_path.display());
    }

    // The register/spill report of every kernel on each run, not only of the ones just rebuilt.
    for src in &sources {
        let report = out.join(format!("{}.ptxas.txt", stem(src)));
        if let Ok(text) = std::fs::read_to_string(&report) {
            for line in summarize_ptxas(&text) {
                println!("cargo:warning={line}");
            }
        }
    }

    write_index(&out, &sources);
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("build.rs: cargo did not set {name}"))
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    }
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn is_file(p: &Path) -> bool {
    p.is_file()
}

/// `NVCC`, then `CUDA_HOME/bin/nvcc`, then the project-local wheels, then PATH.
fn find_nvcc(root: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if !is_file(&p) {
            panic!("NVCC={} is not a file", p.display());
        }
        return p;
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin/nvcc");
        if is_file(&p) {
            return p;
        }
    }
    let local = root.join(LOCAL_NVCC);
    if is_file(&local) {
        return local;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if is_file(&p) {
                return p;
            }
        }
    }
    panic!(
        "feature `cuda` needs nvcc (CUDA 13.0): none in NVCC, CUDA_HOME/bin, {} or PATH. \
         Run `bash tools/install_nvcc.sh` to install the pinned wheels into .cuda/.",
        local.display()
    );
}

/// The wheels' nvcc.profile does not point at their `include/cccl`, which `cuda_bf16.h` needs; a system
/// toolkit has the same layout, so the flags are harmless there.
fn include_flags(nvcc: &Path) -> Vec<String> {
    let mut flags = Vec::new();
    if let Some(top) = nvcc.parent().and_then(Path::parent) {
        let inc = top.join("include");
        if inc.is_dir() {
            flags.push(format!("-I{}", inc.display()));
        }
        let cccl = inc.join("cccl");
        if cccl.is_dir() {
            flags.push("-isystem".into());
            flags.push(cccl.display().to_string());
        }
    }
    flags
}

fn compile(nvcc: &Path, include_flags: &[String], src: &Path, img: &Path, t: &Target) -> Result<(), String> {
    let tmp = img.with_extension("tmp");
    let output = Command::new(nvcc)
        .args(COMMON_FLAGS)
        .args(include_flags)
        .args(t.flags)
        .arg(src)
        .arg("-o")
        .arg(&tmp)
        .output()
        .map_err(|e| format!("{}: cannot run {}: {e}", src.display(), nvcc.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("{} ({}): nvcc exited with {}\n{stdout}{stderr}", src.display(), t.suffix, output.status));
    }
    // Only the cubin goes through ptxas, so only its compile carries the register report.
    if t.suffix.ends_with("cubin") {
        let report = img.with_file_name(format!("{}.ptxas.txt", stem(src)));
        std::fs::write(&report, format!("{stdout}{stderr}"))
            .map_err(|e| format!("cannot write {}: {e}", report.display()))?;
    }
    std::fs::rename(&tmp, img).map_err(|e| format!("cannot write {}: {e}", img.display()))
}

/// One line per kernel: `ptxas sm_90a rmsnorm_bf16: 48 registers, 0 spill stores, 0 spill loads, 128 bytes smem`.
fn summarize_ptxas(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut func = String::new();
    let mut spills = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("ptxas info    : Function properties for ") {
            func = rest.trim().to_string();
        } else if line.contains("bytes stack frame") {
            spills = line.to_string();
        } else if let Some(rest) = line.strip_prefix("ptxas info    : Used ") {
            lines.push(format!("ptxas sm_90a {func}: {spills}; used {rest}"));
        } else if line.contains("warning") || line.contains("error") {
            lines.push(format!("ptxas: {line}"));
        }
    }
    lines
}

fn write_index(out: &Path, sources: &[PathBuf]) {
    let mut index = String::from(
        "/// (module name, sm_80 PTX, sm_90a cubin) for every `kernels/*.cu`, generated by build.rs.\n\
         pub const KERNELS: &[(&str, &str, &[u8])] = &[\n",
    );
    for src in sources {
        let stem = stem(src);
        let ptx = out.join(format!("{stem}.{}", TARGETS[0].suffix));
        let cubin = out.join(format!("{stem}.{}", TARGETS[1].suffix));
        index.push_str(&format!(
            "    ({stem:?}, include_str!({:?}), include_bytes!({:?})),\n",
            ptx.display().to_string(),
            cubin.display().to_string()
        ));
    }
    index.push_str("];\n");
    let path = out.join("kernels_index.rs");
    // Rewriting an unchanged index would bump its mtime and recompile the crate for nothing.
    if std::fs::read_to_string(&path).is_ok_and(|old| old == index) {
        return;
    }
    if let Err(e) = std::fs::write(&path, index) {
        panic!("cannot write {}: {e}", path.display());
    }
}
