//! Bad checkpoints, built from the tiny HF fixtures with tempfile + the safetensors crate: each is an error
//! that names the tensor and/or file, and none panics.

use std::path::{Path, PathBuf};

use facellm::config::{ModelConfig, ModelKind};
use facellm::loader::{expected_tensors, open_model, Checkpoint, DType};
use facellm::Error;
use safetensors::tensor::TensorView as StView;
use safetensors::Dtype as StDtype;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/tiny").join(rel)
}

struct Raw {
    name: String,
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_raw(path: &Path) -> Vec<Raw> {
    let bytes = std::fs::read(path).expect("read fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("fixture parses");
    let mut out: Vec<Raw> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| Raw { name, dtype: t.dtype(), shape: t.shape().to_vec(), data: t.data().to_vec() })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn write_raw(path: &Path, tensors: &[Raw]) {
    let views: Vec<(String, StView)> = tensors
        .iter()
        .map(|t| (t.name.clone(), StView::new(t.dtype, t.shape.clone(), &t.data).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// A temp model folder: the fixture's config.json plus `tensors` (runtime-named vit300m by default) written
/// by `edit` as model.safetensors.
fn folder_with(edit: impl FnOnce(&mut Vec<Raw>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(fixture("vit300m_runtime/config.json"), dir.path().join("config.json")).expect("config");
    let mut tensors = read_raw(&fixture("vit300m_runtime/model.safetensors"));
    edit(&mut tensors);
    write_raw(&dir.path().join("model.safetensors"), &tensors);
    dir
}

fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(src).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

fn tensor_err(result: Result<impl Sized, Error>) -> (String, String, String) {
    match result {
        Err(Error::Tensor { file, tensor, msg }) => (file, tensor, msg),
        Err(other) => panic!("expected a Tensor error, got: {other}"),
        Ok(_) => panic!("expected a Tensor error, got Ok"),
    }
}

fn checkpoint_err(result: Result<impl Sized, Error>) -> (String, String) {
    match result {
        Err(Error::Checkpoint { file, msg }) => (file, msg),
        Err(other) => panic!("expected a Checkpoint error, got: {other}"),
        Ok(_) => panic!("expected a Checkpoint error, got Ok"),
    }
}

const FC2_BIAS: &str = "model.vision_tower.encoder.layer.1.mlp.fc2.bias";
const FC1_WEIGHT: &str = "model.vision_tower.encoder.layer.0.mlp.fc1.weight";

#[test]
fn untouched_copy_is_valid() {
    let dir = folder_with(|_| {});
    open_model(dir.path()).expect("unmodified copy");
}

#[test]
fn missing_folder_and_no_weights() {
    let (file, msg) = checkpoint_err(Checkpoint::open("/nonexistent/facellm/ckpt", ModelKind::InternVl));
    assert_eq!((file.as_str(), msg.as_str()), ("/nonexistent/facellm/ckpt", "model folder not found"));
    assert!(open_model("/nonexistent/facellm/ckpt").is_err());

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pytorch_model.bin"), b"x").expect("write");
    let (file, msg) = checkpoint_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
    assert_eq!(file, dir.path().display().to_string());
    assert!(msg.contains("model.safetensors") && msg.contains(".bin"), "{msg}");
}

#[test]
fn missing_tensor() {
    let dir = folder_with(|t| t.retain(|t| t.name != FC2_BIAS));
    let (file, tensor, msg) = tensor_err(open_model(dir.path()));
    assert_eq!(tensor, FC2_BIAS);
    assert!(file.ends_with("model.safetensors"), "{file}");
    assert!(msg.contains("missing") && msg.contains("[32]"), "{msg}");
}

#[test]
fn misshaped_tensor() {
    let dir = folder_with(|t| {
        if let Some(x) = t.iter_mut().find(|t| t.name == FC1_WEIGHT) {
            x.shape = vec![32, 64];
        }
    });
    let (file, tensor, msg) = tensor_err(open_model(dir.path()));
    assert_eq!(tensor, FC1_WEIGHT);
    assert!(file.ends_with("model.safetensors"), "{file}");
    assert!(msg.contains("[32, 64]") && msg.contains("[64, 32]"), "{msg}");
}

#[test]
fn unexpected_extra_tensor_and_allowed_inv_freq() {
    let extra = "model.vision_tower.encoder.layer.2.lambda_1";
    let dir =
        folder_with(|t| t.push(Raw { name: extra.into(), dtype: StDtype::BF16, shape: vec![32], data: vec![0; 64] }));
    let (file, tensor, msg) = tensor_err(open_model(dir.path()));
    assert_eq!(tensor, extra);
    assert!(file.ends_with("model.safetensors") && msg.contains("unexpected"), "{file}: {msg}");

    let inv_freq = "language_model.model.layers.0.self_attn.rotary_emb.inv_freq";
    let dir =
        folder_with(|t| t.push(Raw { name: inv_freq.into(), dtype: StDtype::F32, shape: vec![4], data: vec![0; 16] }));
    let (_, ckpt) = open_model(dir.path()).expect("inv_freq is allow-listed");
    assert_eq!(ckpt.ignored(), &[inv_freq.to_string()]);
}

#[test]
fn unsupported_dtype() {
    let dir = folder_with(|t| {
        if let Some(x) = t.iter_mut().find(|t| t.name == FC2_BIAS) {
            x.dtype = StDtype::I64;
            x.data = vec![0; 32 * 8];
        }
    });
    let (file, tensor, msg) = tensor_err(open_model(dir.path()));
    assert_eq!(tensor, FC2_BIAS);
    assert!(file.ends_with("model.safetensors") && msg.contains("I64"), "{file}: {msg}");
}

#[test]
fn truncated_file() {
    let dir = folder_with(|_| {});
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).expect("meta").len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
    file.set_len(len - 100).expect("truncate");
    let (file, tensor, msg) = tensor_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
    assert!(file.ends_with("model.safetensors"), "{file}");
    assert!(msg.contains("out of bounds") && msg.contains("truncated"), "{msg}");
    // The tensor stored last is the one cut.
    let bytes = std::fs::read(fixture("vit300m_runtime/model.safetensors")).expect("read");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let last = meta.tensors().into_iter().max_by_key(|(_, info)| info.data_offsets.1).map(|(n, _)| n);
    assert_eq!(Some(tensor), last);

    // Cut inside the header, and below the 8-byte length field.
    for keep in [100u64, 4] {
        let dir = folder_with(|_| {});
        let path = dir.path().join("model.safetensors");
        std::fs::OpenOptions::new().write(true).open(&path).expect("open").set_len(keep).expect("truncate");
        let (file, msg) = checkpoint_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
        assert!(file.ends_with("model.safetensors"), "{file}");
        assert!(msg.contains("truncated"), "keep {keep}: {msg}");
    }
}

#[test]
fn corrupt_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    let mut state = 12345u32;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (state >> 16) as u8
        })
        .collect();
    std::fs::write(&path, &garbage).expect("write");
    let (file, msg) = checkpoint_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
    assert!(file.ends_with("model.safetensors") && msg.contains("header"), "{file}: {msg}");

    // A plausible length but a header that is not JSON.
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"this is not json");
    std::fs::write(&path, &bytes).expect("write");
    let (file, msg) = checkpoint_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
    assert!(file.ends_with("model.safetensors") && msg.contains("corrupt"), "{file}: {msg}");
}

#[test]
fn index_naming_a_missing_shard() {
    let dir = copy_dir(&fixture("vit300m_sharded"));
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).expect("remove");
    let (file, msg) = checkpoint_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
    assert!(file.ends_with("model.safetensors.index.json"), "{file}");
    assert!(msg.contains("model-00002-of-00002.safetensors") && msg.contains("does not exist"), "{msg}");
}

fn edit_index(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(index["weight_map"].as_object_mut().expect("weight_map"));
    std::fs::write(&path, serde_json::to_string(&index).expect("json")).expect("write");
}

#[test]
fn index_disagreeing_with_shards() {
    let moved = "language_model.lm_head.weight";
    let dir = copy_dir(&fixture("vit300m_sharded"));
    edit_index(dir.path(), |m| {
        m.insert(moved.into(), "model-00002-of-00002.safetensors".into());
    });
    let (file, tensor, msg) = tensor_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
    assert_eq!(tensor, moved);
    assert!(file.ends_with("model-00001-of-00002.safetensors") || file.ends_with("model-00002-of-00002.safetensors"));
    assert!(msg.contains("lists it"), "{msg}");

    let dir = copy_dir(&fixture("vit300m_sharded"));
    edit_index(dir.path(), |m| {
        m.remove(moved);
    });
    let (_, tensor, msg) = tensor_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
    assert_eq!(tensor, moved);
    assert!(msg.contains("not listed"), "{msg}");

    let dir = copy_dir(&fixture("vit300m_sharded"));
    edit_index(dir.path(), |m| {
        m.insert(moved.into(), "../model-00001-of-00002.safetensors".into());
    });
    let (file, msg) = checkpoint_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
    assert!(file.ends_with("index.json") && msg.contains("plain file name"), "{msg}");

    let dir = copy_dir(&fixture("vit300m_sharded"));
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"metadata\": {}}").expect("write");
    let (file, msg) = checkpoint_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
    assert!(file.ends_with("index.json") && msg.contains("weight_map"), "{msg}");
}

#[test]
fn tensor_stored_under_both_names() {
    let dir = folder_with(|t| {
        let dup = t.iter().find(|t| t.name == FC2_BIAS).map(|t| Raw {
            name: "vision_tower.encoder.layer.1.mlp.fc2.bias".into(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: t.data.clone(),
        });
        t.extend(dup);
    });
    let (_, _, msg) = tensor_err(Checkpoint::open(dir.path(), ModelKind::InternVl));
    assert!(msg.contains("stored twice") && msg.contains(FC2_BIAS), "{msg}");
}

#[test]
fn wrong_kind_reports_all_problems_count() {
    let cfg = ModelConfig::load(fixture("qwen2_tied")).expect("config");
    let ckpt = Checkpoint::open(fixture("vit300m"), ModelKind::Qwen2).expect("opens: names are only mapped");
    let problems = ckpt.problems(&expected_tensors(&cfg));
    assert!(problems.len() > 10);
    let err = ckpt.validate(&expected_tensors(&cfg)).expect_err("mismatch");
    assert!(err.to_string().contains(&format!("(and {} more problems)", problems.len() - 1)), "{err}");
}

/// A safetensors file written by hand with a 1-byte-odd header, so every tensor starts at an odd address.
#[test]
fn unaligned_tensors_convert() {
    let header = concat!(
        r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"#,
        r#""b":{"dtype":"BF16","shape":[2],"data_offsets":[12,16]},"#,
        r#""c":{"dtype":"F16","shape":[2],"data_offsets":[16,20]}}"#
    );
    let header = if header.len().is_multiple_of(2) { format!("{header} ") } else { header.to_string() };
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for v in [1.5f32, -2.25, 3.0e-3] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    for v in [half::bf16::from_f32(0.5), half::bf16::from_f32(-7.0)] {
        bytes.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    for v in [half::f16::from_f32(0.25), half::f16::from_f32(-3.5)] {
        bytes.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("model.safetensors"), &bytes).expect("write");
    let ckpt = Checkpoint::open(dir.path(), ModelKind::Qwen2).expect("open");

    let a = ckpt.tensor("a").expect("a");
    assert_eq!(a.bytes.as_ptr() as usize % 2, 1, "test needs an odd address");
    assert_eq!(a.to_f32_vec(), vec![1.5, -2.25, 3.0e-3]);
    assert_eq!(a.to_bf16_vec()[0], half::bf16::from_f32(1.5));
    let b = ckpt.tensor("b").expect("b");
    assert_eq!(b.dtype, DType::BF16);
    assert!(b.as_bf16_slice().is_none(), "unaligned bytes must not be cast");
    assert_eq!(b.to_f32_vec(), vec![0.5, -7.0]);
    let c = ckpt.tensor("c").expect("c");
    assert_eq!(c.to_f32_vec(), vec![0.25, -3.5]);
    assert_eq!(c.to_bf16_vec(), vec![half::bf16::from_f32(0.25), half::bf16::from_f32(-3.5)]);
    let (_, tensor, _) = tensor_err(ckpt.tensor("nope"));
    assert_eq!(tensor, "nope");
}
