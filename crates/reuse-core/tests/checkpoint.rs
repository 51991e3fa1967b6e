//! Checkpoint files: round trips per dtype, typed errors for bad files, atomic writes.

use proptest::prelude::*;
use reuse_core::checkpoint::write_atomic_with;
use reuse_core::{Checkpoint, Error};
use tch::{Device, Kind, Tensor};

fn sample(kind: Kind, shape: &[i64]) -> Tensor {
    let t = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 50.0;
    match kind {
        Kind::Float | Kind::Half | Kind::BFloat16 => t.to_kind(kind),
        Kind::Uint8 => t.abs().clamp(0.0, 255.0).to_kind(kind),
        Kind::Int8 => t.clamp(-128.0, 127.0).to_kind(kind),
        _ => (t * 1e6).to_kind(kind),
    }
}

const KINDS: [Kind; 7] = [
    Kind::Float,
    Kind::Half,
    Kind::BFloat16,
    Kind::Int8,
    Kind::Uint8,
    Kind::Int,
    Kind::Int64,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn round_trip_every_dtype(shape in prop::collection::vec(0i64..5, 0..4), k in 0usize..7) {
        let kind = KINDS[k];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let t = sample(kind, &shape);
        let mut ck = Checkpoint::new();
        ck.insert("layer.weight", t.shallow_clone());
        ck.insert("other", sample(Kind::Float, &[3]));
        ck.set_metadata("format", "pt").set_metadata("note", "hello");
        ck.save(&path).unwrap();
        let back = Checkpoint::load(&path, Device::Cpu).unwrap();
        let u = back.tensor("layer.weight").unwrap();
        prop_assert_eq!(u.kind(), kind);
        prop_assert_eq!(u.size(), shape.clone());
        prop_assert!(u.equal(&t));
        prop_assert_eq!(back.metadata().get("note").map(String::as_str), Some("hello"));
        prop_assert_eq!(back.names().collect::<Vec<_>>(), vec!["layer.weight", "other"]);
    }
}

fn saved(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("m.safetensors");
    let mut ck = Checkpoint::new();
    ck.insert(
        "a",
        Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]),
    );
    ck.insert("b", Tensor::ones([5], (Kind::Int64, Device::Cpu)));
    ck.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let e = Checkpoint::load("/nonexistent/x.safetensors", Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/x.safetensors"));
}

#[test]
fn truncated_and_corrupt_files_are_typed_errors_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = saved(dir.path());
    for (name, content) in [
        ("truncated", bytes[..bytes.len() - 7].to_vec()),
        ("header-cut", bytes[..20].to_vec()),
        (
            "garbage",
            b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header".to_vec(),
        ),
        ("empty", Vec::new()),
    ] {
        let p = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&p, &content).unwrap();
        let e = Checkpoint::load(&p, Device::Cpu).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{name}: {e:?}");
        assert!(
            e.to_string().contains(&format!("{name}.safetensors")),
            "{e}"
        );
        assert_eq!(
            std::fs::read(&p).unwrap(),
            content,
            "loading modified {name}"
        );
    }
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn unknown_dtype_names_file_and_tensor() {
    // Hand-built safetensors with a BOOL tensor.
    let header = br#"{"x":{"dtype":"BOOL","shape":[8],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[1u8; 8]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bool.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    let e = Checkpoint::load(&p, Device::Cpu).unwrap_err();
    match &e {
        Error::UnknownDtype { tensor, dtype, .. } => {
            assert_eq!(tensor, "x");
            assert_eq!(dtype, "BOOL");
        }
        other => panic!("expected UnknownDtype, got {other:?}"),
    }
    assert!(e.to_string().contains("bool.safetensors"));
}

#[test]
fn missing_tensor_and_shape_mismatch_name_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = saved(dir.path());
    let ck = Checkpoint::load(&path, Device::Cpu).unwrap();
    let e = ck.tensor("c").unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }));
    assert!(
        e.to_string().contains("m.safetensors") && e.to_string().contains("`c`"),
        "{e}"
    );
    let e = ck.tensor_with_shape("a", &[4, 3]).unwrap_err();
    match &e {
        Error::ShapeMismatch {
            tensor,
            expected,
            found,
            ..
        } => {
            assert_eq!(tensor, "a");
            assert_eq!(expected, &vec![4, 3]);
            assert_eq!(found, &vec![3, 4]);
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("m.safetensors"));
}

#[test]
fn failed_atomic_write_keeps_the_old_file_and_leaves_no_temp() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = saved(dir.path());
    let e = write_atomic_with(&path, |f| {
        use std::io::Write;
        f.write_all(b"half of a new file")?;
        Err(std::io::Error::other("disk full (simulated)"))
    })
    .unwrap_err();
    assert!(e.to_string().contains("disk full"));
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "old file changed");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
    // An unsupported kind fails before anything is written.
    let mut ck = Checkpoint::new();
    ck.insert("d", Tensor::ones([2], (Kind::Bool, Device::Cpu)));
    assert!(ck.save(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn equal_checkpoints_serialise_to_equal_bytes_whatever_the_metadata() {
    let mut c = Checkpoint::new();
    c.insert(
        "b.weight",
        Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([3, 1]),
    );
    c.insert("a.bias", Tensor::from_slice(&[7i64, 8]));
    for (k, v) in [
        ("zeta", "1"),
        ("alpha", "2"),
        ("format", "pt"),
        ("mid", "x"),
        ("b", "y"),
    ] {
        c.set_metadata(k, v);
    }
    let first = c.to_bytes().unwrap();
    for _ in 0..8 {
        assert_eq!(c.to_bytes().unwrap(), first, "bytes changed between saves");
    }
    let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header length {n} is not 8-aligned");
    let back = Checkpoint::from_bytes(&first, std::path::Path::new("mem"), Device::Cpu).unwrap();
    assert_eq!(back.metadata(), c.metadata());
    for (name, t) in c.iter() {
        assert!(back.tensor(name).unwrap().equal(t), "{name}");
    }
}
