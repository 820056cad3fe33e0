//! The official `openai` Python client against the real server: `tools/openai_client_check.py` (answers
//! equal `facellm generate`, usage right, typed errors) and `tools/load_test.py` (64 concurrent streaming
//! clients, then half of them hanging up; every answer equal to its single-request answer, KV blocks back
//! to zero). They need the tools venv with `openai` installed (tools/setup_venv.sh); without it the test
//! says SKIPPED and passes, as in CI.

use std::path::PathBuf;
use std::process::Command;

fn python() -> Option<PathBuf> {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/.venv/bin/python");
    let ok = py.exists() && Command::new(&py).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

fn run_tool(py: &PathBuf, script: &str, extra: &[&str]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools");
    let out = Command::new(py)
        .arg(dir.join(script))
        .args(["--facellm", env!("CARGO_BIN_EXE_facellm")])
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{script}:\n{stdout}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn openai_python_client_and_load_test() {
    let Some(py) = python() else {
        println!(
            "SKIPPED openai_python_client_and_load_test: no tools/.venv with the `openai` package \
             (tools/setup_venv.sh installs tools/requirements.txt)"
        );
        return;
    };
    run_tool(&py, "openai_client_check.py", &[]);
    run_tool(&py, "load_test.py", &["--clients", "64", "--max-tokens", "12"]);
}
