//! `facellm preprocess` end to end: the JSON summary agrees with the HF reference recorded in fixtures.json, and
//! bad inputs exit with code 1 and a one-line message naming the file.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

fn run_json(args: &[&str]) -> Value {
    let out = Command::cargo_bin("facellm").expect("binary").arg("preprocess").args(args).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn summary_matches_reference() {
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("fixtures.json")).expect("fixtures")).expect("parse");
    for name in ["pd_obama_biden_two_people.jpg", "gen_exif_rot6.jpg"] {
        let want = fx["images"].as_array().expect("images").iter().find(|i| i["name"] == name).expect(name);
        let path = dir().join(name);
        let got = run_json(&["--image", path.to_str().expect("utf-8 path")]);
        for key in ["width", "height", "grid", "num_tiles", "shape"] {
            assert_eq!(got[key], want[key], "{name}: {key}");
        }
        for key in ["mean", "std"] {
            for c in 0..3 {
                let (g, w) = (got[key][c].as_f64().unwrap_or(f64::NAN), want[key][c].as_f64().unwrap_or(f64::NAN));
                assert!((g - w).abs() < 1e-6, "{name}: {key}[{c}] {g} vs {w}");
            }
        }
        let tiles = want["num_tiles"].as_u64().unwrap_or(0) as usize;
        assert_eq!(got["first8"].as_array().map(Vec::len), Some(tiles));
        for t in 0..tiles {
            for k in 0..8 {
                let (g, w) = (
                    got["first8"][t][k].as_f64().unwrap_or(f64::NAN),
                    want["first8"][t][k].as_f64().unwrap_or(f64::NAN),
                );
                assert_eq!(g as f32, w as f32, "{name}: tile {t} value {k}");
            }
        }
    }
}

#[test]
fn options_change_the_grid() {
    let path = dir().join("gen_1024.jpg");
    let p = path.to_str().expect("utf-8 path");
    assert_eq!(run_json(&["--image", p])["num_tiles"], 10);
    let four = run_json(&["--image", p, "--max-tiles", "4"]);
    assert_eq!((four["grid"].clone(), four["num_tiles"].clone()), (serde_json::json!([2, 2]), 5.into()));
    let single = run_json(&["--image", p, "--no-tiling"]);
    assert_eq!((single["grid"].clone(), single["num_tiles"].clone()), (serde_json::json!([1, 1]), 1.into()));
}

#[test]
fn errors_exit_1_naming_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = tmp.path().join("readme.jpg");
    std::fs::write(&text, "hello").expect("write");
    let face = dir().join("fairface_repo_race_Asian_face0.jpg");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--image".into(), text.display().to_string()], "readme.jpg"),
        (vec!["--image".into(), face.display().to_string(), "--max-tiles".into(), "13".into()], "max_tiles"),
        (vec!["--image".into(), face.display().to_string(), "--max-pixels".into(), "100".into()], "limit"),
        (vec!["--image".into(), "/nonexistent.png".into()], "/nonexistent.png"),
    ];
    for (args, needle) in cases {
        let out = Command::cargo_bin("facellm").expect("binary").arg("preprocess").args(&args).output().expect("run");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: ") && err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
    }
}
