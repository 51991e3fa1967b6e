//! Property tests over damaged GGUF headers: take the tiny valid file, truncate it, flip
//! bytes, or write huge numbers where counts, lengths, dimensions and offsets live. The
//! reader must never panic, must never allocate more than a small multiple of the file's
//! size while parsing, and must either refuse the file with an error or give a header
//! whose every tensor can be read.
//!
//! A counting allocator (this test binary's global allocator) records each thread's peak
//! live bytes during `GgufFile::from_bytes`.

mod gguf_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use reuse_core::gguf::{self, llama, GgufFile};
use tch::Device;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // try_with: the thread-locals may be gone while a thread shuts down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated on this thread while `f` runs, above what was live before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, isize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get) - base)
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Cut the file to this fraction of its length.
    Truncate(f64),
    /// Set the byte at this fraction of the length to a value.
    Byte(f64, u8),
    /// Overwrite one of the header's u64 fields (a count, string or array length,
    /// dimension or offset; picked by this fraction of their list) with a value.
    Huge(f64, u64),
    /// Overwrite one of the header's u32 fields (value type, dimension count, ggml type).
    Small(f64, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let big = prop_oneof![
        Just(u64::MAX),
        Just(i64::MAX as u64),
        Just(1u64 << 62),
        Just(1u64 << 40),
        Just(1u64 << 32),
        Just(u32::MAX as u64),
        0u64..64,
        0u64..100_000,
        any::<u64>(),
    ];
    let small = prop_oneof![0u32..16, 16u32..64, Just(u32::MAX), any::<u32>()];
    prop_oneof![
        1 => (0.0..1.0f64).prop_map(Mutation::Truncate),
        1 => (0.0..1.0f64, any::<u8>()).prop_map(|(p, b)| Mutation::Byte(p, b)),
        3 => (0.0..1.0f64, big).prop_map(|(p, v)| Mutation::Huge(p, v)),
        2 => (0.0..1.0f64, small).prop_map(|(p, v)| Mutation::Small(p, v)),
    ]
}

/// Where the valid file's header keeps its u64 fields and its u32 fields.
struct Fields {
    u64s: Vec<usize>,
    u32s: Vec<usize>,
}

/// Walks the (valid) header and records each numeric field's position.
fn fields(b: &[u8]) -> Fields {
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap()) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let mut f = Fields {
        u64s: vec![8, 16],
        u32s: vec![4],
    };
    fn value(b: &[u8], f: &mut Fields, mut i: usize, t: u32) -> usize {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap()) as usize;
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        match t {
            0 | 1 | 7 => i + 1,
            2 | 3 => i + 2,
            4..=6 => i + 4,
            10..=12 => i + 8,
            8 => {
                f.u64s.push(i);
                i + 8 + u64_at(i)
            }
            9 => {
                let et = u32_at(i);
                f.u32s.push(i);
                f.u64s.push(i + 4);
                let n = u64_at(i + 4);
                i += 12;
                for _ in 0..n {
                    i = value(b, f, i, et);
                }
                i
            }
            _ => unreachable!("the tiny file is valid"),
        }
    }
    let (n_tensors, n_kv) = (u64_at(8), u64_at(16));
    let mut i = 24;
    for _ in 0..n_kv {
        f.u64s.push(i);
        i += 8 + u64_at(i);
        let t = u32_at(i);
        f.u32s.push(i);
        i = value(b, &mut f, i + 4, t);
    }
    for _ in 0..n_tensors {
        f.u64s.push(i);
        i += 8 + u64_at(i);
        let nd = u32_at(i) as usize;
        f.u32s.push(i);
        i += 4;
        for _ in 0..nd {
            f.u64s.push(i);
            i += 8;
        }
        f.u32s.push(i);
        f.u64s.push(i + 4);
        i += 12;
    }
    f
}

fn apply(bytes: &mut Vec<u8>, fields: &Fields, m: &Mutation) {
    let pick = |p: f64, v: &[usize]| v[((p * v.len() as f64) as usize).min(v.len() - 1)];
    match *m {
        Mutation::Truncate(p) => bytes.truncate((p * bytes.len() as f64) as usize),
        Mutation::Byte(p, b) => {
            if !bytes.is_empty() {
                let i = ((p * bytes.len() as f64) as usize).min(bytes.len() - 1);
                bytes[i] = b;
            }
        }
        Mutation::Huge(p, v) => {
            let i = pick(p, &fields.u64s);
            if i + 8 <= bytes.len() {
                bytes[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        Mutation::Small(p, v) => {
            let i = pick(p, &fields.u32s);
            if i + 4 <= bytes.len() {
                bytes[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Everything a caller might do with a file that opened; none of it may panic.
fn exercise(f: &GgufFile) {
    for t in f.tensors() {
        let _ = f.tensor_bytes(t.name());
        if t.ggml_type().can_dequantize() {
            let d = f.dequantize(t.name(), Device::Cpu);
            if let Ok(d) = d {
                assert_eq!(d.numel() as u64, t.n_elements());
            }
        }
        let _ = f.quant_parts(t.name(), Device::Cpu);
        let _ = llama::load_tensor(f, t.name(), Device::Cpu);
    }
    let _ = llama::hf_config(f);
    let _ = llama::load_state_dict(f, Device::Cpu);
    let _ = gguf::tokenizer(f);
    let _ = gguf::chat_template(f);
    for (k, _) in f.metadata() {
        let _ = f.get_u32(k);
        let _ = f.get_f32(k);
        let _ = f.get_str_array(k);
        let _ = f.get_i64_array(k);
    }
}

/// What parsing may allocate: a fixed allowance (the read buffer is at most the file) plus
/// a small multiple of the file's size (a string in a Vec costs 24 bytes for its 8-byte
/// length, a tensor info about 100 bytes for its 32; the indexes copy the names).
fn allowance(len: usize) -> isize {
    (64 * 1024 + 32 * len) as isize
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn damaged_headers_never_panic_or_overallocate(
        mutations in proptest::collection::vec(mutation(), 1..4)
    ) {
        let mut bytes = gguf_common::tiny_llama().to_bytes();
        let fields = fields(&bytes);
        for m in &mutations {
            apply(&mut bytes, &fields, m);
        }
        let len = bytes.len();
        let (parsed, peak) = peak_during(|| GgufFile::from_bytes(bytes, "fuzz.gguf"));
        // The file's own bytes are moved in, not copied, so the allowance is on top of them.
        prop_assert!(peak <= allowance(len), "parsing a {len}-byte file allocated {peak} bytes");
        match parsed {
            Ok(f) => exercise(&f),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(!msg.contains('\n'), "one-line error: {msg}");
                prop_assert!(msg.starts_with("fuzz.gguf: "), "names the file: {msg}");
            }
        }
    }
}

#[test]
fn the_field_walker_finds_every_field() {
    let bytes = gguf_common::tiny_llama().to_bytes();
    let f = fields(&bytes);
    let file = GgufFile::from_bytes(bytes.clone(), "tiny.gguf").unwrap();
    // Header counts + per entry (key length, type, ...) + per tensor (name length, n_dims,
    // dims, type, offset).
    assert!(f.u64s.len() > 2 + file.metadata().len() + 3 * file.tensors().len());
    assert!(f.u32s.iter().all(|&i| i + 4 <= file.data_offset() as usize));
    assert!(f.u64s.iter().all(|&i| i + 8 <= file.data_offset() as usize));
}

#[test]
fn the_valid_file_parses_within_the_allowance() {
    let bytes = gguf_common::tiny_llama().to_bytes();
    let len = bytes.len();
    let (f, peak) = peak_during(|| GgufFile::from_bytes(bytes, "tiny.gguf"));
    exercise(&f.unwrap());
    assert!(peak <= allowance(len), "{peak} bytes for a {len}-byte file");
}
