//! The GGUF reader on small files made here: valid files round-trip, every kind of damage
//! is a one-line error naming the key or tensor, dequantization matches hand-built blocks,
//! and the Llama mapping (names, Q/K unpermutation, config, tokenizer) does what
//! transformers does. The real SmolLM2 file is in `gguf_smollm2.rs`; fuzzing in
//! `gguf_fuzz.rs`.

mod gguf_common;

use gguf_common::*;
use half::{bf16, f16};
use reuse_core::gguf::{self, llama, Array, GgmlType, GgufFile, GgufWriter, Value};
use reuse_core::Error;
use tch::{Device, Kind, Tensor};

fn open(bytes: Vec<u8>) -> reuse_core::Result<GgufFile> {
    GgufFile::from_bytes(bytes, "test.gguf")
}

fn err(bytes: Vec<u8>) -> String {
    let e = open(bytes).expect_err("expected the file to be refused");
    let msg = e.to_string();
    assert!(matches!(e, Error::Corrupt { .. }), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(msg.starts_with("test.gguf: "), "names the file: {msg}");
    msg
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).reshape([-1])).unwrap()
}

const U32: u32 = 4;
const STRING: u32 = 8;
const ARRAY: u32 = 9;

// ---------------------------------------------------------------- valid files

#[test]
fn tiny_llama_round_trips() {
    let bytes = tiny_llama().to_bytes();
    let f = open(bytes.clone()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);
    assert_eq!(f.file_size(), bytes.len() as u64);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.tensors().len(), tiny_weights().len());
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.ggml_type(), GgmlType::Q4_1);
    assert_eq!(q.dims(), &[32, 32]);
    assert_eq!(q.shape(), vec![32, 32]);
    assert_eq!(q.n_bytes(), 32 * 20);
    let e = f.tensor("token_embd.weight").unwrap();
    assert_eq!(
        e.dims(),
        &[32, TOKENS.len() as u64],
        "GGUF order: ne0 first"
    );
    assert_eq!(e.shape(), vec![TOKENS.len() as i64, 32], "PyTorch order");
    assert!(matches!(f.tensor("nope"), Err(Error::MissingTensor { .. })));
    // Every stored type dequantizes close to the values written (exactly for F32).
    for (_, g, shape, vals, t) in tiny_weights() {
        let heads = llama::permuted_heads(&f, &g).unwrap();
        let got = llama::load_tensor(&f, &g, Device::Cpu).unwrap();
        assert_eq!(got.size(), shape, "{g}");
        let got = to_vec(&got);
        let tol = match t {
            GgmlType::F32 => 0.0,
            GgmlType::F16 => 1e-3,
            GgmlType::BF16 => 1e-2,
            GgmlType::Q8_0 => 1.0 / 127.0,
            _ => 2.0 / 15.0,
        };
        let worst = got
            .iter()
            .zip(&vals)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= tol,
            "{g} ({t}, heads {heads:?}): max error {worst}"
        );
    }
}

#[test]
fn metadata_getters_accept_any_integer_that_fits() {
    let f = open(tiny_llama().to_bytes()).unwrap();
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 32, "from u64");
    assert_eq!(
        f.get_u64("llama.feed_forward_length").unwrap(),
        64,
        "from i32"
    );
    assert_eq!(
        f.get_u32("llama.attention.head_count_kv").unwrap(),
        1,
        "from u16"
    );
    assert_eq!(f.get_i64("llama.block_count").unwrap(), 1);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(
        f.get_f32("llama.block_count").unwrap(),
        1.0,
        "ints read as floats"
    );
    assert_eq!(f.get_str("general.name").unwrap(), "tiny");
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        TOKENS.len()
    );
    assert_eq!(f.get_i64_array("tokenizer.ggml.token_type").unwrap()[0], 3);
    assert_eq!(
        f.get("test.nested"),
        Some(&Value::Array(Array::Array(vec![
            Array::U8(vec![1, 2]),
            Array::F64(vec![0.5])
        ])))
    );
    let e = f.get_str("llama.block_count").unwrap_err().to_string();
    assert!(
        e.contains("`llama.block_count`") && e.contains("expected a string"),
        "{e}"
    );
    let e = f.get_u32("missing.key").unwrap_err().to_string();
    assert!(e.contains("`missing.key` is missing"), "{e}");
    let e = f.get_bool("general.name").unwrap_err().to_string();
    assert!(
        e.contains("`general.name`") && e.contains("\"tiny\""),
        "{e}"
    );

    let mut w = GgufWriter::new();
    w.metadata("neg", Value::I8(-1))
        .metadata("big", Value::U64(1 << 40));
    let f = open(w.to_bytes()).unwrap();
    let e = f.get_u32("neg").unwrap_err().to_string();
    assert!(e.contains("`neg`") && e.contains("-1"), "{e}");
    assert!(f.get_u32("big").is_err());
    assert_eq!(f.get_u64("big").unwrap(), 1 << 40);
    assert_eq!(f.get_i64("neg").unwrap(), -1);
}

#[test]
fn version_2_and_custom_alignment_read() {
    let mut w = tiny_llama();
    w.version(2).metadata("general.alignment", Value::U32(64));
    let f = open(w.to_bytes()).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    for t in f.tensors() {
        assert_eq!(t.offset() % 64, 0);
    }
    llama::load_state_dict(&f, Device::Cpu).unwrap();
}

#[test]
fn writes_atomically_to_disk_and_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_llama().write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), path);
    let a = f.dequantize("blk.0.ffn_down.weight", Device::Cpu).unwrap();
    let b = open(std::fs::read(&path).unwrap())
        .unwrap()
        .dequantize("blk.0.ffn_down.weight", Device::Cpu)
        .unwrap();
    assert!(a.equal(&b));
    let e = GgufFile::open(dir.path().join("absent.gguf")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

// ---------------------------------------------------------------- damaged files

#[test]
fn truncated_file_names_what_it_was_reading() {
    let bytes = tiny_llama().to_bytes();
    // Inside the metadata: the key being read is named.
    let key = b"tokenizer.ggml.tokens";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 20;
    let msg = err(bytes[..at].to_vec());
    assert!(msg.contains("`tokenizer.ggml.tokens`"), "{msg}");
    assert!(
        msg.contains("truncated") || msg.contains("larger than"),
        "{msg}"
    );
    // Inside the data: the tensor whose bytes are cut is named.
    let f = open(bytes.clone()).unwrap();
    let last = f.tensors().iter().max_by_key(|t| t.file_offset()).unwrap();
    let cut = (last.file_offset() + 3) as usize;
    let msg = err(bytes[..cut].to_vec());
    assert!(msg.contains(&format!("`{}`", last.name())), "{msg}");
    assert!(msg.contains("past the end of the file"), "{msg}");
    // Every prefix is refused cleanly.
    for n in 0..bytes.len() {
        assert!(open(bytes[..n].to_vec()).is_err(), "prefix of {n} bytes");
    }
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    let bytes = raw(3, &[], &[("blk.0.attn_q.weight", vec![32], 99, 0)], 64);
    let msg = err(bytes);
    assert!(
        msg.contains("`blk.0.attn_q.weight`") && msg.contains("unknown ggml type 99"),
        "{msg}"
    );
    // A removed id (Q4_2 = 4) is unknown too.
    let msg = err(raw(3, &[], &[("w", vec![32], 4, 0)], 64));
    assert!(msg.contains("unknown ggml type 4"), "{msg}");
}

#[test]
fn tensor_past_the_end_names_the_tensor() {
    // 32 F32 = 128 bytes, only 64 in the file.
    let msg = err(raw(3, &[], &[("blk.3.ffn_up.weight", vec![32], 0, 0)], 64));
    assert!(
        msg.contains("`blk.3.ffn_up.weight`") && msg.contains("past the end"),
        "{msg}"
    );
    // An offset so large that start + size overflows.
    let msg = err(raw(3, &[], &[("w", vec![32], 0, u64::MAX - 31)], 256));
    assert!(msg.contains("`w`") && msg.contains("past the end"), "{msg}");
}

#[test]
fn shape_not_a_multiple_of_the_block_names_the_tensor() {
    // Q4_1 (id 3) with ne0 = 48.
    let msg = err(raw(
        3,
        &[],
        &[("blk.0.ffn_down.weight", vec![48, 2], 3, 0)],
        1024,
    ));
    assert!(msg.contains("`blk.0.ffn_down.weight`"), "{msg}");
    assert!(
        msg.contains("Q4_1") && msg.contains("48") && msg.contains("multiple of 32"),
        "{msg}"
    );
    // Q6_K needs 256.
    let msg = err(raw(3, &[], &[("k", vec![128], 14, 0)], 1024));
    assert!(
        msg.contains("`k`") && msg.contains("multiple of 256"),
        "{msg}"
    );
}

#[test]
fn version_1_and_other_headers_are_refused() {
    let msg = err(raw(1, &[], &[], 0));
    assert!(msg.contains("version 1 is not supported"), "{msg}");
    let msg = err(raw(4, &[], &[], 0));
    assert!(msg.contains("unsupported GGUF version 4"), "{msg}");
    let msg = err(raw(3u32.swap_bytes(), &[], &[], 0));
    assert!(msg.contains("big-endian"), "{msg}");
    let mut bytes = raw(3, &[], &[], 0);
    bytes[0] = b'g';
    let msg = err(bytes);
    assert!(msg.contains("not a GGUF file"), "{msg}");
    let msg = err(Vec::new());
    assert!(msg.contains("header"), "{msg}");
}

#[test]
fn huge_string_length_is_an_error_not_an_allocation() {
    // A value string claiming 2^62 bytes.
    let mut v = (1u64 << 62).to_le_bytes().to_vec();
    v.extend_from_slice(b"abc");
    let msg = err(raw(3, &[("general.name", STRING, v)], &[], 0));
    assert!(
        msg.contains("`general.name`") && msg.contains("string length 4611686018427387904"),
        "{msg}"
    );
    // A key claiming u64::MAX bytes.
    let mut bytes = raw(3, &[("k", U32, 7u32.to_le_bytes().to_vec())], &[], 0);
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    let msg = err(bytes);
    assert!(
        msg.contains("metadata entry #0: key") && msg.contains("string length"),
        "{msg}"
    );
    // A tensor name claiming more than the file.
    let mut bytes = raw(3, &[], &[("w", vec![32], 0, 0)], 128);
    bytes[24..32].copy_from_slice(&1_000_000u64.to_le_bytes());
    let msg = err(bytes);
    assert!(
        msg.contains("tensor info #0: name") && msg.contains("string length 1000000"),
        "{msg}"
    );
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    // An array of 2^60 u64 in a tiny file.
    let mut v = 10u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let msg = err(raw(3, &[("tokenizer.ggml.scores", ARRAY, v)], &[], 0));
    assert!(
        msg.contains("`tokenizer.ggml.scores`")
            && msg.contains("array of 1152921504606846976 uint64"),
        "{msg}"
    );
    // Header counts.
    let mut bytes = raw(3, &[], &[], 0);
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err(bytes).contains("metadata entries"));
    let mut bytes = raw(3, &[], &[], 0);
    bytes[8..16].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(err(bytes).contains("1125899906842624 tensors"));
}

#[test]
fn unknown_value_type_names_the_key() {
    let msg = err(raw(3, &[("llama.block_count", 13, vec![0; 8])], &[], 0));
    assert!(
        msg.contains("`llama.block_count`") && msg.contains("unknown value type 13"),
        "{msg}"
    );
    // In an array's element type.
    let mut v = 77u32.to_le_bytes().to_vec();
    v.extend_from_slice(&1u64.to_le_bytes());
    let msg = err(raw(3, &[("arr", ARRAY, v)], &[], 0));
    assert!(
        msg.contains("`arr`") && msg.contains("unknown value type 77"),
        "{msg}"
    );
    // A bool that is neither 0 nor 1.
    let msg = err(raw(3, &[("flag", 7, vec![2])], &[], 0));
    assert!(
        msg.contains("`flag`") && msg.contains("bool byte is 2"),
        "{msg}"
    );
    // Invalid UTF-8.
    let mut v = 2u64.to_le_bytes().to_vec();
    v.extend_from_slice(&[0xff, 0xfe]);
    let msg = err(raw(3, &[("s", STRING, v)], &[], 0));
    assert!(msg.contains("`s`") && msg.contains("UTF-8"), "{msg}");
}

#[test]
fn overlapping_and_misaligned_tensors_are_refused() {
    let msg = err(raw(
        3,
        &[],
        &[("a", vec![32], 0, 0), ("b", vec![32], 0, 64)],
        256,
    ));
    assert!(
        msg.contains("`a`") && msg.contains("`b`") && msg.contains("overlap"),
        "{msg}"
    );
    let msg = err(raw(3, &[], &[("m", vec![8], 0, 4)], 256));
    assert!(
        msg.contains("`m`") && msg.contains("offset 4 is not a multiple of the alignment 32"),
        "{msg}"
    );
}

#[test]
fn bad_dimensions_are_refused() {
    let msg = err(raw(3, &[], &[("big", vec![1 << 40, 1 << 40], 0, 0)], 64));
    assert!(
        msg.contains("`big`") && msg.contains("more than 2^63 - 1 elements"),
        "{msg}"
    );
    let msg = err(raw(3, &[], &[("neg", vec![u64::MAX], 0, 0)], 64));
    assert!(
        msg.contains("`neg`") && msg.contains("larger than 2^63 - 1"),
        "{msg}"
    );
    let msg = err(raw(3, &[], &[("five", vec![1, 1, 1, 1, 1], 0, 0)], 64));
    assert!(
        msg.contains("`five`") && msg.contains("5 dimensions"),
        "{msg}"
    );
    let msg = err(raw(3, &[], &[("none", vec![], 0, 0)], 64));
    assert!(
        msg.contains("`none`") && msg.contains("0 dimensions"),
        "{msg}"
    );
    // Q8_0 of 2^62 rows: bytes overflow even though elements fit.
    let msg = err(raw(3, &[], &[("q", vec![32, 1 << 57], 8, 0)], 64));
    assert!(msg.contains("`q`"), "{msg}");
    // A zero dimension is an empty tensor, not an error.
    let f = open(raw(3, &[], &[("empty", vec![0, 3], 0, 0)], 0)).unwrap();
    assert_eq!(
        f.dequantize("empty", Device::Cpu).unwrap().size(),
        vec![3, 0]
    );
}

#[test]
fn bad_alignment_duplicates_and_nesting_are_refused() {
    let msg = err(raw(
        3,
        &[("general.alignment", U32, 24u32.to_le_bytes().to_vec())],
        &[],
        0,
    ));
    assert!(
        msg.contains("`general.alignment`") && msg.contains("power of two"),
        "{msg}"
    );
    let msg = err(raw(
        3,
        &[("general.alignment", 10, 32u64.to_le_bytes().to_vec())],
        &[],
        0,
    ));
    assert!(
        msg.contains("`general.alignment`") && msg.contains("uint64 32"),
        "{msg}"
    );
    let one = 1u32.to_le_bytes().to_vec();
    let msg = err(raw(3, &[("k", U32, one.clone()), ("k", U32, one)], &[], 0));
    assert!(msg.contains("`k` appears twice"), "{msg}");
    let msg = err(raw(
        3,
        &[],
        &[("t", vec![8], 0, 0), ("t", vec![8], 0, 32)],
        64,
    ));
    assert!(msg.contains("`t` appears twice"), "{msg}");
    // Arrays of arrays of ... 100 deep.
    let mut v = Vec::new();
    for _ in 0..100 {
        v.extend_from_slice(&ARRAY.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
    }
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    let msg = err(raw(3, &[("deep", ARRAY, v)], &[], 0));
    assert!(
        msg.contains("`deep`") && msg.contains("nested more than"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- dequantization

fn one_tensor(t: GgmlType, ne0: u64, bytes: Vec<u8>) -> GgufFile {
    let mut w = GgufWriter::new();
    w.tensor_bytes("w", t, &[ne0], bytes).unwrap();
    open(w.to_bytes()).unwrap()
}

fn deq(t: GgmlType, ne0: u64, bytes: Vec<u8>) -> Vec<f32> {
    to_vec(
        &one_tensor(t, ne0, bytes)
            .dequantize("w", Device::Cpu)
            .unwrap(),
    )
}

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[test]
fn q8_0_block_by_hand() {
    let mut b = h(0.5).to_vec();
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let got = deq(GgmlType::Q8_0, 32, b);
    let want: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
    assert_eq!(got, want);
}

#[test]
fn q4_0_block_by_hand() {
    // Byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
    let mut b = h(0.25).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = deq(GgmlType::Q4_0, 32, b);
    let want: Vec<f32> = (0..32)
        .map(|i| {
            let q = if i < 16 { i } else { 15 - (i - 16) };
            0.25 * (q as f32 - 8.0)
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn q4_1_block_by_hand() {
    let mut b = h(0.5).to_vec();
    b.extend(h(-2.0));
    b.extend((0..16u8).map(|j| j | ((j / 2) << 4)));
    let got = deq(GgmlType::Q4_1, 32, b);
    let want: Vec<f32> = (0..32)
        .map(|i| {
            let q = if i < 16 { i } else { (i - 16) / 2 };
            0.5 * q as f32 - 2.0
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn q5_blocks_by_hand() {
    // Fifth bit of weight j: bit j of the u32 after the scale(s).
    let qh: u32 = 0xA5A5_0F0F;
    let nib: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    let q = |i: usize| -> u32 {
        let low = if i < 16 {
            i as u32
        } else {
            15 - (i as u32 - 16)
        };
        low | (((qh >> i) & 1) << 4)
    };
    let mut b = h(0.5).to_vec();
    b.extend(qh.to_le_bytes());
    b.extend(&nib);
    let want: Vec<f32> = (0..32).map(|i| 0.5 * (q(i) as f32 - 16.0)).collect();
    assert_eq!(deq(GgmlType::Q5_0, 32, b), want);
    let mut b = h(0.25).to_vec();
    b.extend(h(1.0));
    b.extend(qh.to_le_bytes());
    b.extend(&nib);
    let want: Vec<f32> = (0..32).map(|i| 0.25 * q(i) as f32 + 1.0).collect();
    assert_eq!(deq(GgmlType::Q5_1, 32, b), want);
}

#[test]
fn float_types_by_hand() {
    let vals = [1.0f32, -2.5, 65504.0, 1e-3, 0.0, -0.0, 3.140625, 1234.5];
    let f16b: Vec<u8> = vals.iter().flat_map(|&v| h(v)).collect();
    let want: Vec<f32> = vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    assert_eq!(deq(GgmlType::F16, 8, f16b), want);
    let bf: Vec<u8> = vals
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let want: Vec<f32> = vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_eq!(deq(GgmlType::BF16, 8, bf), want);
    let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(deq(GgmlType::F32, 8, f32b), vals.to_vec());
    let f64b: Vec<u8> = vals
        .iter()
        .flat_map(|&v| f64::from(v).to_le_bytes())
        .collect();
    assert_eq!(deq(GgmlType::F64, 8, f64b), vals.to_vec());
}

#[test]
fn undequantizable_types_are_a_clear_error() {
    let f = one_tensor(GgmlType::IQ2_XXS, 256, vec![0; 66]);
    let e = f.dequantize("w", Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("IQ2_XXS"), "{e}");
    let e = f.quant_parts("w", Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("IQ2_XXS"), "{e}");
    assert_eq!(f.tensor_bytes("w").unwrap().len(), 66);
}

#[test]
fn quant_parts_recompose_bit_exactly() {
    let vals = values(4 * 96, 9);
    for t in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
        let mut w = GgufWriter::new();
        w.tensor_f32("w", &[4, 96], &vals, t).unwrap();
        let f = open(w.to_bytes()).unwrap();
        let p = f.quant_parts("w", Device::Cpu).unwrap();
        assert_eq!(p.ggml_type, t);
        assert_eq!(p.scales.size(), vec![4, 3]);
        assert_eq!(p.codes.size(), vec![4, 96]);
        assert_eq!(p.mins.is_some(), t == GgmlType::Q4_1);
        let code_kind = if t == GgmlType::Q8_0 {
            Kind::Int8
        } else {
            Kind::Uint8
        };
        assert_eq!(p.codes.kind(), code_kind);
        if t != GgmlType::Q8_0 {
            assert!(p.codes.max().int64_value(&[]) <= 15);
        }
        let direct = f.dequantize("w", Device::Cpu).unwrap();
        assert!(p.dequantize().unwrap().equal(&direct), "{t}");
        // The reference rounding keeps each weight within one step of the input.
        let step = if t == GgmlType::Q8_0 {
            1.0 / 127.0
        } else {
            2.0 / 15.0
        };
        let worst = to_vec(&direct)
            .iter()
            .zip(&vals)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= step, "{t}: {worst}");
    }
}

// ---------------------------------------------------------------- Llama mapping

#[test]
fn hf_tensor_names() {
    let cases = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            "blk.12.attn_k.bias",
            "model.layers.12.self_attn.k_proj.bias",
        ),
        (
            "blk.3.attn_v.weight",
            "model.layers.3.self_attn.v_proj.weight",
        ),
        (
            "blk.3.attn_output.weight",
            "model.layers.3.self_attn.o_proj.weight",
        ),
        (
            "blk.29.attn_norm.weight",
            "model.layers.29.input_layernorm.weight",
        ),
        (
            "blk.29.ffn_norm.weight",
            "model.layers.29.post_attention_layernorm.weight",
        ),
        (
            "blk.1.ffn_gate.weight",
            "model.layers.1.mlp.gate_proj.weight",
        ),
        ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
        (
            "blk.1.ffn_down.weight",
            "model.layers.1.mlp.down_proj.weight",
        ),
    ];
    for (g, hf) in cases {
        assert_eq!(llama::hf_tensor_name(g).as_deref(), Some(hf), "{g}");
    }
    for bad in [
        "rope_freqs.weight",
        "blk.x.attn_q.weight",
        "blk..attn_q.weight",
        "blk.0.attn_q",
        "blk.0.ssm_a.weight",
        "token_embd.scale",
    ] {
        assert_eq!(llama::hf_tensor_name(bad), None, "{bad}");
    }
}

#[test]
fn unpermute_inverts_llama_cpp_permutation() {
    // The permutation as llama.cpp writes it, spelled out on row indices: GGUF row
    // (head h, pair p, half i) holds Hugging Face row (head h, half p, i).
    let (n_head, rows) = (3i64, 24i64);
    let hf = Tensor::arange(rows, (Kind::Int64, Device::Cpu));
    let g = llama::permute_rows(&hf, n_head).unwrap();
    let half = rows / n_head / 2;
    let g = Vec::<i64>::try_from(&g).unwrap();
    for h in 0..n_head {
        for i in 0..half {
            for p in 0..2 {
                let gguf_row = h * 2 * half + i * 2 + p;
                let hf_row = h * 2 * half + p * half + i;
                assert_eq!(g[gguf_row as usize], hf_row);
            }
        }
    }
    let w = Tensor::randn([rows, 5], (Kind::Float, Device::Cpu));
    let back = llama::unpermute_rows(&llama::permute_rows(&w, n_head).unwrap(), n_head).unwrap();
    assert!(back.equal(&w));
    let b = Tensor::randn([rows], (Kind::Float, Device::Cpu));
    assert!(
        llama::unpermute_rows(&llama::permute_rows(&b, 4).unwrap(), 4)
            .unwrap()
            .equal(&b)
    );
    let e = llama::unpermute_rows(&w, 5).unwrap_err().to_string();
    assert!(e.contains("24 rows") && e.contains("5 heads"), "{e}");
}

#[test]
fn tiny_llama_state_dict_is_hugging_face_layout() {
    let f = open(tiny_llama().to_bytes()).unwrap();
    let sd = llama::load_state_dict(&f, Device::Cpu).unwrap();
    let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
    let want: Vec<String> = tiny_weights().into_iter().map(|w| w.0).collect();
    assert_eq!(names, want, "file order, HF names, no lm_head when tied");
    assert_eq!(
        llama::permuted_heads(&f, "blk.0.attn_q.weight").unwrap(),
        Some(HEADS)
    );
    assert_eq!(
        llama::permuted_heads(&f, "blk.0.attn_k.weight").unwrap(),
        Some(KV_HEADS)
    );
    assert_eq!(
        llama::permuted_heads(&f, "blk.0.attn_v.weight").unwrap(),
        None
    );
    // Q was written permuted from HF values: loading restores them (up to Q4_1 rounding,
    // which is row-local, so compare with the HF rows quantized the same way).
    let (_, _, shape, vals, _) = tiny_weights().into_iter().nth(2).unwrap();
    let mut w = GgufWriter::new();
    w.tensor_f32("q", &shape, &vals, GgmlType::Q4_1).unwrap();
    let hf_quantized = open(w.to_bytes())
        .unwrap()
        .dequantize("q", Device::Cpu)
        .unwrap();
    let q = &sd
        .iter()
        .find(|(n, _)| n.ends_with("q_proj.weight"))
        .unwrap()
        .1;
    assert!(q.equal(&hf_quantized), "unpermuted Q equals the HF rows");
    // Quantization parts come out in HF row order too.
    let p = llama::hf_quant_parts(&f, "blk.0.attn_q.weight", Device::Cpu).unwrap();
    assert!(p.dequantize().unwrap().equal(q));
    let p = llama::hf_quant_parts(&f, "blk.0.attn_k.weight", Device::Cpu).unwrap();
    let k = &sd
        .iter()
        .find(|(n, _)| n.ends_with("k_proj.weight"))
        .unwrap()
        .1;
    assert!(p.dequantize().unwrap().equal(k));
}

#[test]
fn llama_q_bias_is_unpermuted_too() {
    // llama.cpp permutes q/k biases with their weights (attention_bias models).
    let bias = values(HIDDEN as usize, 77);
    let hf = Tensor::from_slice(&bias);
    let stored = Vec::<f32>::try_from(&llama::permute_rows(&hf, HEADS).unwrap()).unwrap();
    assert_ne!(stored, bias);
    let mut w = tiny_llama();
    w.tensor_f32("blk.0.attn_q.bias", &[HIDDEN], &stored, GgmlType::F32)
        .unwrap();
    let f = open(w.to_bytes()).unwrap();
    let b = llama::load_tensor(&f, "blk.0.attn_q.bias", Device::Cpu).unwrap();
    assert_eq!(to_vec(&b), bias);
    assert_eq!(llama::hf_config(&f).unwrap()["attention_bias"], true);
}

#[test]
fn hf_config_of_tiny_llama() {
    let f = open(tiny_llama().to_bytes()).unwrap();
    let c = llama::hf_config(&f).unwrap();
    let want = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "max_position_embeddings": 128, "rms_norm_eps": f64::from(1e-5f32),
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "vocab_size": TOKENS.len(), "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "unk_token_id": null,
        "hidden_act": "silu", "attention_bias": false, "mlp_bias": false,
        "pretraining_tp": 1, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": true, "torch_dtype": "float32",
    });
    assert_eq!(c, want);
}

#[test]
fn other_architectures() {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", Value::String("mamba".into()));
    let f = open(w.to_bytes()).unwrap();
    for e in [
        llama::hf_config(&f).unwrap_err(),
        llama::load_state_dict(&f, Device::Cpu).unwrap_err(),
    ] {
        let e = e.to_string();
        assert!(
            e.contains("`mamba` is not a supported") && e.contains("llama, qwen2"),
            "{e}"
        );
    }
    // qwen2: the same names plus q/k/v biases, no permutation, its own config class.
    let mut w = GgufWriter::new();
    for (k, v) in [
        ("qwen2.block_count", 1u32),
        ("qwen2.context_length", 64),
        ("qwen2.embedding_length", 32),
        ("qwen2.feed_forward_length", 64),
        ("qwen2.attention.head_count", 2),
        ("qwen2.attention.head_count_kv", 1),
    ] {
        w.metadata(k, Value::U32(v));
    }
    w.metadata("general.architecture", Value::String("qwen2".into()))
        .metadata("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6))
        .metadata("qwen2.rope.freq_base", Value::F32(1e6));
    let q = values(32 * 32, 3);
    let qb = values(32, 4);
    w.tensor_f32(
        "token_embd.weight",
        &[4, 32],
        &values(128, 1),
        GgmlType::F32,
    )
    .unwrap()
    .tensor_f32("blk.0.attn_q.weight", &[32, 32], &q, GgmlType::F32)
    .unwrap()
    .tensor_f32("blk.0.attn_q.bias", &[32], &qb, GgmlType::F32)
    .unwrap()
    .tensor_f32("output.weight", &[4, 32], &values(128, 2), GgmlType::F32)
    .unwrap();
    let f = open(w.to_bytes()).unwrap();
    let c = llama::hf_config(&f).unwrap();
    assert_eq!(c["model_type"], "qwen2");
    assert_eq!(c["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(
        c["vocab_size"], 4,
        "from token_embd when there is no vocabulary"
    );
    assert!(c.get("head_dim").is_none());
    let sd = llama::load_state_dict(&f, Device::Cpu).unwrap();
    let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "lm_head.weight"
        ]
    );
    assert_eq!(to_vec(&sd[1].1), q, "no unpermutation for qwen2");
    assert_eq!(to_vec(&sd[2].1), qb);
}

#[test]
fn unknown_tensors_and_rope_scaling() {
    let mut w = tiny_llama();
    w.tensor_f32("blk.0.ssm_a.weight", &[32], &values(32, 1), GgmlType::F32)
        .unwrap();
    let f = open(w.to_bytes()).unwrap();
    let e = llama::load_state_dict(&f, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`blk.0.ssm_a.weight`") && e.contains("not a Llama-family tensor"),
        "{e}"
    );

    // Llama 3.1 scaling as llama.cpp's converter writes it: one factor per frequency
    // (theta 10000, head_dim 16: frequencies 0-5 unscaled, 6 smoothed, 7 scaled by 32).
    let factors: Vec<f32> = (0..8)
        .map(|i| {
            let freq = 1.0 / 10000f64.powf(2.0 * i as f64 / 16.0);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < 2048.0 {
                1.0
            } else if wavelen > 8192.0 {
                32.0
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                (1.0 / ((1.0 - smooth) / 32.0 + smooth)) as f32
            }
        })
        .collect();
    assert!(factors[5] == 1.0 && factors[6] > 1.0 && factors[6] < 32.0 && factors[7] == 32.0);
    let mut w = tiny_llama();
    w.tensor_f32("rope_freqs.weight", &[8], &factors, GgmlType::F32)
        .unwrap();
    let f = open(w.to_bytes()).unwrap();
    let c = llama::hf_config(&f).unwrap();
    let want = serde_json::json!({
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    });
    assert_eq!(c["rope_scaling"], want);
    assert_eq!(c["rope_parameters"]["rope_type"], "llama3");
    assert_eq!(c["rope_parameters"]["rope_theta"], 10000.0);
    let sd = llama::load_state_dict(&f, Device::Cpu).unwrap();
    assert_eq!(
        sd.len(),
        tiny_weights().len(),
        "rope_freqs is not a parameter"
    );
    // Factors that Llama 3's parameters do not give are refused.
    let mut odd = factors.clone();
    odd[6] *= 1.5;
    let mut w = tiny_llama();
    w.tensor_f32("rope_freqs.weight", &[8], &odd, GgmlType::F32)
        .unwrap();
    let e = llama::hf_config(&open(w.to_bytes()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`rope_freqs.weight`") && e.contains("factor 6"),
        "{e}"
    );

    let mut w = tiny_llama();
    w.metadata("llama.rope.scaling.type", Value::String("linear".into()))
        .metadata("llama.rope.scaling.factor", Value::F32(4.0));
    let c = llama::hf_config(&open(w.to_bytes()).unwrap()).unwrap();
    assert_eq!(c["rope_scaling"]["factor"], 4.0);
    assert_eq!(c["rope_parameters"]["rope_type"], "linear");
    let mut w = tiny_llama();
    w.metadata("llama.rope.scaling.type", Value::String("yarn".into()));
    let e = llama::hf_config(&open(w.to_bytes()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("llama.rope.scaling.type") && e.contains("`yarn`"),
        "{e}"
    );
}

// ---------------------------------------------------------------- tokenizer

#[test]
fn tiny_tokenizer_follows_the_metadata() {
    let f = open(tiny_llama().to_bytes()).unwrap();
    let tok = gguf::tokenizer(&f).unwrap();
    let ids = |s: &str| tok.encode(s, true).unwrap().get_ids().to_vec();
    // "abc" merges fully; " ab" is Ġ + ab ("Ġ a" ranks after "a b"); <think> stays whole.
    assert_eq!(ids("abc ab<think>a"), [8, 6, 7, 10, 3]);
    // Control tokens are special and matched whole; no BOS is added (add_bos_token absent).
    assert_eq!(ids("<|im_start|>a<|im_end|>"), [1, 3, 2]);
    // " x" (a real space) is respelled "Ġx" in the vocabulary.
    assert_eq!(tok.token_to_id("Ġx"), Some(11));
    assert_eq!(ids(" x"), [11]);
    assert_eq!(
        tok.decode(&[8, 6, 7, 10, 3], false).unwrap(),
        "abc ab<think>a"
    );
    assert_eq!(tok.decode(&[1, 3, 2], true).unwrap(), "a");
    assert_eq!(gguf::chat_template(&f).as_deref(), Some("{{ messages }}"));

    // add_bos_token = true prepends the BOS (and add_eos_token appends the EOS).
    let mut w = tiny_llama();
    w.metadata("tokenizer.ggml.add_bos_token", Value::Bool(true))
        .metadata("tokenizer.ggml.add_eos_token", Value::Bool(true));
    let tok = gguf::tokenizer(&open(w.to_bytes()).unwrap()).unwrap();
    assert_eq!(tok.encode("ab", true).unwrap().get_ids(), [1, 7, 2]);
    assert_eq!(tok.encode("ab", false).unwrap().get_ids(), [7]);
}

#[test]
fn tokenizer_errors_name_the_key() {
    let mut w = tiny_llama();
    w.metadata("tokenizer.ggml.model", Value::String("llama".into()));
    let e = open(w.to_bytes()).unwrap_err().to_string();
    assert!(e.contains("`tokenizer.ggml.model` appears twice"), "{e}");

    let mut w = GgufWriter::new();
    w.metadata("tokenizer.ggml.model", Value::String("t5".into()));
    let e = gguf::tokenizer(&open(w.to_bytes()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("`t5`"),
        "{e}"
    );

    let mut w = GgufWriter::new();
    w.metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(vec!["a".into()])),
        )
        .metadata(
            "tokenizer.ggml.merges",
            Value::Array(Array::String(vec!["ab".into()])),
        );
    let e = gguf::tokenizer(&open(w.to_bytes()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenizer.ggml.merges[0]"), "{e}");

    let mut w = GgufWriter::new();
    w.metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(vec!["a".into()])),
        )
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(5));
    let e = gguf::tokenizer(&open(w.to_bytes()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.ggml.bos_token_id") && e.contains("token id 5"),
        "{e}"
    );
}

#[test]
fn every_block_type_matches_gguf_py_bit_for_bit() {
    // fixtures/gguf_quants: random blocks written and dequantized by gguf-py 0.19.
    let dir = reuse_testkit::fixtures_dir().join("gguf_quants");
    let f = GgufFile::open(dir.join("blocks.gguf")).unwrap();
    let r = reuse_core::Checkpoint::load(dir.join("reference.safetensors"), Device::Cpu).unwrap();
    let mut seen = Vec::new();
    for t in f.tensors() {
        let ours = f.dequantize(t.name(), Device::Cpu).unwrap();
        let theirs = r.tensor(t.name()).unwrap();
        assert_eq!(ours.size(), [2, 512], "{}", t.name());
        assert!(
            ours.equal(theirs),
            "{} ({}) differs from gguf-py",
            t.name(),
            t.ggml_type()
        );
        seen.push(t.ggml_type());
    }
    use GgmlType::*;
    for t in [F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K] {
        assert!(seen.contains(&t), "{t} is covered");
    }
}
