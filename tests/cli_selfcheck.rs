//! `facellm selfcheck` where it cannot check anything: it must say why and exit non-zero, never pass
//! vacuously. (On a GPU machine, `facellm selfcheck --device cuda` is the check itself: ../shared/docs/GPU.md.)

use assert_cmd::Command;
use predicates::prelude::*;

fn facellm() -> Command {
    Command::cargo_bin("facellm").unwrap()
}

#[test]
fn selfcheck_without_a_gpu_fails_and_says_why() {
    let has_gpu = std::path::Path::new("/dev/nvidiactl").exists();
    if has_gpu && cfg!(feature = "cuda") {
        println!("SKIPPED: this machine has an NVIDIA driver; the selfcheck would run for real");
        return;
    }
    let reason = if cfg!(feature = "cuda") { "no GPU to check" } else { "no CUDA backend" };
    facellm().args(["selfcheck", "--device", "cuda"]).assert().code(1).stderr(predicate::str::contains(reason));
}

#[test]
fn selfcheck_refuses_the_cpu() {
    facellm()
        .args(["selfcheck", "--device", "cpu"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("compares the CUDA backend with the CPU backend"));
}

#[test]
fn bench_cuda_without_a_gpu_is_a_clear_error() {
    let has_gpu = std::path::Path::new("/dev/nvidiactl").exists();
    if has_gpu && cfg!(feature = "cuda") {
        println!("SKIPPED: this machine has an NVIDIA driver");
        return;
    }
    facellm()
        .args(["bench", "--device", "cuda", "--vision", "300m"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cuda").and(predicate::str::contains("panicked").not()));
}
