//! Teacher caches: what a lookup returns equals what the teacher computed (bit for bit
//! in f32), top-k as `torch.topk` of `log_softmax`, per token with the mask, pooled
//! features; shuffled lookups across shards; another teacher or dataset refused with
//! nothing changed on disk; truncated shards caught; an interrupted build resumes to the
//! cache an uninterrupted build writes.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use reuse_core::data::{Batch, BatchSource};
use reuse_core::models::{Bert, BertClassifier, BertConfig};
use reuse_core::trainer::StepOutputs;
use reuse_core::ForwardOptions;
use reuse_core::{Error, Result};
use reuse_distill::cache::{shard_file_name, BUILD_FILE, MANIFEST_FILE};
use reuse_distill::teacher::fingerprint_tensors;
use reuse_distill::{build_cache, dataset_fingerprint, CacheConfig, Teacher, TeacherCache};
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 40;
const CPU: Device = Device::Cpu;

/// Token ids of varying lengths; batches are trimmed to their longest example, as
/// reuse-core's `TokenizedDataset` does.
struct TokenData {
    ids: Tensor,
    lens: Vec<i64>,
    labels: Tensor,
}

impl TokenData {
    fn new(n: usize, max_len: i64, seed: i64) -> Self {
        tch::manual_seed(seed);
        let ids = Tensor::randint_low(1, VOCAB, [n as i64, max_len], (Kind::Int64, CPU));
        let lens: Vec<i64> = (0..n as i64)
            .map(|i| 1 + (i * 7 + seed) % max_len)
            .collect();
        let labels = Tensor::randint(3, [n as i64], (Kind::Int64, CPU));
        Self { ids, lens, labels }
    }
}

impl BatchSource for TokenData {
    fn len(&self) -> usize {
        self.lens.len()
    }

    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch> {
        if let Some(bad) = indices.iter().find(|&&i| i < 0 || i >= self.len() as i64) {
            return Err(Error::invalid("index", format!("{bad} out of range")));
        }
        let lens: Vec<i64> = indices.iter().map(|&i| self.lens[i as usize]).collect();
        let t = lens.iter().copied().max().unwrap_or(1).max(1);
        let idx = Tensor::from_slice(indices);
        let pos = Tensor::arange(t, (Kind::Int64, CPU)).unsqueeze(0);
        let mask = pos
            .lt_tensor(&Tensor::from_slice(&lens).unsqueeze(1))
            .to_kind(Kind::Int64);
        let ids = self.ids.index_select(0, &idx).narrow(1, 0, t) * &mask;
        Ok(Batch {
            inputs: ids.to_device(device),
            mask: Some(mask.to_device(device)),
            padded: lens.iter().any(|&l| l < t),
            labels: self.labels.index_select(0, &idx).to_device(device),
            indices: indices.to_vec(),
            task_ids: None,
        })
    }
}

fn classifier(seed: i64, classes: i64) -> BertClassifier {
    tch::manual_seed(seed);
    let bert = Bert::random(BertConfig::tiny(VOCAB, 16, 1), CPU).unwrap();
    BertClassifier::new(bert, classes)
}

/// A per-token teacher: logits `[b, t, VOCAB]` from a table lookup of each token.
struct TokenTeacher {
    table: Tensor,
}

impl TokenTeacher {
    fn new(seed: i64) -> Self {
        tch::manual_seed(seed);
        Self {
            table: Tensor::randn([VOCAB, VOCAB], (Kind::Float, CPU)) * 3.0,
        }
    }
}

impl Teacher for TokenTeacher {
    fn teach(&self, batch: &Batch, _opts: ForwardOptions) -> Result<StepOutputs> {
        let (b, t) = (batch.inputs.size()[0], batch.inputs.size()[1]);
        let l = self
            .table
            .index_select(0, &batch.inputs.reshape([-1]))
            .view([b, t, VOCAB]);
        Ok(StepOutputs::logits(l))
    }

    fn fingerprint(&self) -> String {
        fingerprint_tensors(&mut [("table".to_string(), self.table.shallow_clone())])
    }
}

/// Counts calls to its teacher and fails from call `fail_at` on.
struct Counting<'a> {
    inner: &'a dyn Teacher,
    calls: Cell<usize>,
    fail_at: Option<usize>,
}

impl<'a> Counting<'a> {
    fn new(inner: &'a dyn Teacher, fail_at: Option<usize>) -> Self {
        Self {
            inner,
            calls: Cell::new(0),
            fail_at,
        }
    }
}

impl Teacher for Counting<'_> {
    fn teach(&self, batch: &Batch, opts: ForwardOptions) -> Result<StepOutputs> {
        let n = self.calls.get();
        if self.fail_at.is_some_and(|f| n >= f) {
            return Err(Error::invalid("teacher", "simulated crash"));
        }
        self.calls.set(n + 1);
        self.inner.teach(batch, opts)
    }

    fn fingerprint(&self) -> String {
        self.inner.fingerprint()
    }
}

/// The teacher's outputs over the whole data, in the batches a build uses.
fn reference(
    teacher: &dyn Teacher,
    data: &dyn BatchSource,
    shard: usize,
    batch: usize,
    pooled: bool,
) -> (Tensor, Option<Tensor>) {
    let n = data.len();
    let (mut logits, mut pools) = (Vec::new(), Vec::new());
    for s0 in (0..n).step_by(shard) {
        let s1 = (s0 + shard).min(n);
        for b0 in (s0..s1).step_by(batch) {
            let idx: Vec<i64> = (b0 as i64..(b0 + batch).min(s1) as i64).collect();
            let b = data.batch(&idx, CPU).unwrap();
            let o = teacher
                .teach(
                    &b,
                    ForwardOptions {
                        pooled,
                        ..Default::default()
                    },
                )
                .unwrap();
            logits.push(o.logits);
            if let Some(p) = o.pooled {
                pools.push(p);
            }
        }
    }
    (
        Tensor::cat(&logits, 0),
        pooled.then(|| Tensor::cat(&pools, 0)),
    )
}

fn cfg() -> CacheConfig {
    CacheConfig::full_logits().with_shard_size(16)
}

/// Shuffled indices that visit every shard, some twice.
const SHUFFLED: [i64; 9] = [37, 2, 49, 16, 15, 3, 33, 2, 48];

fn listing(dir: &Path) -> BTreeMap<String, (u64, SystemTime, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                (
                    m.len(),
                    m.modified().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                ),
            )
        })
        .collect()
}

fn no_temp_files(dir: &Path) {
    for name in listing(dir).keys() {
        assert!(!name.contains(".tmp-"), "temporary file left: {name}");
    }
}

fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn full_logits_f32_are_the_teachers_bit_for_bit_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cache");
    let (teacher, data) = (classifier(1, 5), TokenData::new(50, 9, 0));
    let m = build_cache(&teacher, &data, &out, &cfg(), 8, CPU).unwrap();
    assert_eq!(m.shards.len(), 4);
    assert_eq!((m.shards[3].start, m.shards[3].end), (48, 50));
    assert_eq!(m.num_classes, 5);
    assert!(out.join(MANIFEST_FILE).exists() && !out.join(BUILD_FILE).exists());
    no_temp_files(&out);

    let fp = teacher.fingerprint();
    let dfp = dataset_fingerprint(&data).unwrap();
    let cache = TeacherCache::open(&out, Some(&fp), Some(&dfp)).unwrap();
    cache.verify().unwrap();
    assert_eq!((cache.len(), cache.num_classes()), (50, 5));
    let expected_bpe = m.total_bytes() as f64 / 50.0;
    assert_eq!(cache.bytes_per_example(), expected_bpe);
    assert!(cache.bytes_per_example() < 200.0 + 5.0 * 4.0);

    let (full, _) = reference(&teacher, &data, 16, 8, false);
    let got = cache.lookup(&SHUFFLED, CPU).unwrap();
    let logits = got.logits.unwrap();
    assert_eq!(logits.kind(), Kind::Float);
    assert!(logits.equal(&full.index_select(0, &Tensor::from_slice(&SHUFFLED))));
    assert!(got.topk_logprobs.is_none() && got.mask.is_none() && got.pooled.is_none());
    // The whole cache in order, in one read per shard.
    let all: Vec<i64> = (0..50).collect();
    assert!(cache
        .lookup(&all, CPU)
        .unwrap()
        .logits
        .unwrap()
        .equal(&full));
    // And the live teacher on the shuffled batch itself (other padding: close, not equal).
    let live = teacher
        .teach(
            &data.batch(&SHUFFLED, CPU).unwrap(),
            ForwardOptions::default(),
        )
        .unwrap()
        .logits;
    assert!(logits.allclose(&live, 1e-5, 1e-5, false));

    let e = err_text(cache.lookup(&[3, 50], CPU));
    assert!(e.contains("50") && e.contains("out of range"), "{e}");
    assert!(cache.lookup(&[-1], CPU).is_err());
    let e = err_text(cache.check_classes(3));
    assert!(
        e.contains("5 classes") && e.contains("student has 3"),
        "{e}"
    );
    cache.check_classes(5).unwrap();

    // Building again with the same teacher, data and config changes nothing and runs no
    // teacher batch.
    let before = listing(&out);
    let counting = Counting::new(&teacher, None);
    let again = build_cache(&counting, &data, &out, &cfg(), 8, CPU).unwrap();
    assert_eq!(again, m);
    assert_eq!(counting.calls.get(), 0);
    assert_eq!(listing(&out), before);
}

#[test]
fn top_k_is_torch_topk_of_log_softmax() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, data) = (classifier(2, 7), TokenData::new(40, 8, 1));
    let (full, _) = reference(&teacher, &data, 16, 8, false);
    let (want_v, want_i) = full.log_softmax(-1, Kind::Float).topk(3, -1, true, true);
    let asked: Vec<i64> = SHUFFLED[..8].iter().map(|&i| i.min(39)).collect();
    let idx_asked = Tensor::from_slice(&asked);
    for (dtype, name) in [
        (Kind::Float, "f32"),
        (Kind::Half, "f16"),
        (Kind::BFloat16, "bf16"),
    ] {
        let out = dir.path().join(name);
        let c = CacheConfig::top_k(3).with_dtype(dtype).with_shard_size(16);
        let m = build_cache(&teacher, &data, &out, &c, 8, CPU).unwrap();
        assert_eq!((m.spec.top_k, m.spec.dtype.as_str()), (Some(3), name));
        let cache = TeacherCache::open(&out, None, None).unwrap();
        let got = cache.lookup(&asked, CPU).unwrap();
        assert!(got.logits.is_none());
        let (v, i) = (got.topk_logprobs.unwrap(), got.topk_indices.unwrap());
        assert_eq!((v.kind(), i.kind()), (Kind::Float, Kind::Int64));
        assert_eq!(v.size(), [8, 3]);
        let wv = want_v
            .index_select(0, &idx_asked)
            .to_kind(dtype)
            .to_kind(Kind::Float);
        assert!(v.equal(&wv), "{name}");
        assert!(i.equal(&want_i.index_select(0, &idx_asked)), "{name}");
    }
    // 2 bytes per value and 4 per index: an f16 top-3 row is 18 bytes.
    let f16 = TeacherCache::open(&dir.path().join("f16"), None, None).unwrap();
    let f32 = TeacherCache::open(&dir.path().join("f32"), None, None).unwrap();
    assert!(f16.bytes_per_example() < f32.bytes_per_example());

    // k above the class count: refused, and no folder left behind.
    let out = dir.path().join("k9");
    let e = err_text(build_cache(
        &teacher,
        &data,
        &out,
        &CacheConfig::top_k(9),
        8,
        CPU,
    ));
    assert!(e.contains("k = 9") && e.contains("7 classes"), "{e}");
    assert!(!out.exists());
    assert!(build_cache(&teacher, &data, &out, &CacheConfig::top_k(0), 8, CPU).is_err());
}

#[test]
fn per_token_caches_keep_the_mask_and_pad_to_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, data) = (TokenTeacher::new(3), TokenData::new(45, 11, 2));
    for (c, name) in [
        (cfg().with_per_token(true), "full"),
        (
            CacheConfig::top_k(4)
                .with_dtype(Kind::Float)
                .with_shard_size(16)
                .with_per_token(true),
            "topk",
        ),
    ] {
        let out = dir.path().join(name);
        let m = build_cache(&teacher, &data, &out, &c, 8, CPU).unwrap();
        assert_eq!(m.num_classes, VOCAB as usize);
        assert!(m.shards.iter().all(|s| s.max_len.is_some()));
        let cache = TeacherCache::open(&out, None, None).unwrap();
        for asked in [&SHUFFLED[..6], &[0i64][..], &[16, 17, 18][..]] {
            let asked: Vec<i64> = asked.iter().map(|&i| i.min(44)).collect();
            let batch = data.batch(&asked, CPU).unwrap();
            let mask = batch.mask.as_ref().unwrap();
            let got = cache.lookup(&asked, CPU).unwrap();
            assert!(got.mask.as_ref().unwrap().equal(mask), "{name} {asked:?}");
            let live = teacher
                .teach(&batch, ForwardOptions::default())
                .unwrap()
                .logits;
            let keep = mask.unsqueeze(-1).ne(0);
            let zero = Tensor::zeros([1], (Kind::Float, CPU));
            match c.top_k {
                None => {
                    let l = got.logits.unwrap();
                    assert_eq!(l.size(), live.size());
                    assert!(l.equal(&live.where_self(&keep, &zero)), "{name} {asked:?}");
                }
                Some(k) => {
                    let (wv, wi) = live
                        .log_softmax(-1, Kind::Float)
                        .topk(k as i64, -1, true, true);
                    let (v, i) = (got.topk_logprobs.unwrap(), got.topk_indices.unwrap());
                    assert_eq!(v.size(), [asked.len() as i64, mask.size()[1], 4]);
                    assert!(v.equal(&wv.where_self(&keep, &zero)), "{name} {asked:?}");
                    let zi = Tensor::zeros([1], (Kind::Int64, CPU));
                    assert!(i.equal(&wi.where_self(&keep, &zi)), "{name} {asked:?}");
                }
            }
        }
    }
    // A per-token teacher in a per-example cache: a clear error.
    let e = err_text(build_cache(
        &teacher,
        &data,
        &dir.path().join("bad"),
        &cfg(),
        8,
        CPU,
    ));
    assert!(e.contains("per_token") || e.contains("per-token"), "{e}");
}

#[test]
fn pooled_features_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cache");
    let (teacher, data) = (classifier(4, 3), TokenData::new(33, 7, 3));
    let c = cfg().with_pooled(true);
    let m = build_cache(&teacher, &data, &out, &c, 8, CPU).unwrap();
    assert_eq!(m.pooled_dim, Some(16));
    let (full, pooled) = reference(&teacher, &data, 16, 8, true);
    let cache = TeacherCache::open(&out, None, None).unwrap();
    let asked = [32i64, 0, 17, 5, 16];
    let got = cache.lookup(&asked, CPU).unwrap();
    let idx = Tensor::from_slice(&asked);
    assert!(got
        .pooled
        .unwrap()
        .equal(&pooled.unwrap().index_select(0, &idx)));
    assert!(got.logits.unwrap().equal(&full.index_select(0, &idx)));
    // A teacher without pooled features cannot fill such a cache.
    let e = err_text(build_cache(
        &TokenTeacher::new(0),
        &data,
        &dir.path().join("p"),
        &c.clone().with_per_token(true),
        8,
        CPU,
    ));
    assert!(e.contains("pooled"), "{e}");
}

#[test]
fn another_teacher_dataset_or_config_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cache");
    let (teacher, data) = (classifier(5, 4), TokenData::new(40, 8, 4));
    build_cache(&teacher, &data, &out, &cfg(), 8, CPU).unwrap();
    let other_teacher = classifier(6, 4);
    let other_data = TokenData::new(40, 8, 5);
    let (fp, ofp) = (teacher.fingerprint(), other_teacher.fingerprint());
    let (dfp, odfp) = (
        dataset_fingerprint(&data).unwrap(),
        dataset_fingerprint(&other_data).unwrap(),
    );
    assert_ne!(fp, ofp);
    assert_ne!(dfp, odfp);

    // Opening for another teacher or dataset names both hashes.
    let e = err_text(TeacherCache::open(&out, Some(&ofp), Some(&dfp)));
    assert!(
        e.contains("teacher") && e.contains(&fp) && e.contains(&ofp),
        "{e}"
    );
    let e = err_text(TeacherCache::open(&out, Some(&fp), Some(&odfp)));
    assert!(
        e.contains("dataset") && e.contains(&dfp) && e.contains(&odfp),
        "{e}"
    );

    // Building over it with another teacher, dataset or config: refused, untouched.
    let before = listing(&out);
    let e = err_text(build_cache(&other_teacher, &data, &out, &cfg(), 8, CPU));
    assert!(
        e.contains("teacher (fingerprint)") && e.contains(&ofp),
        "{e}"
    );
    let e = err_text(build_cache(&teacher, &other_data, &out, &cfg(), 8, CPU));
    assert!(
        e.contains("dataset (fingerprint)") && e.contains(&odfp),
        "{e}"
    );
    let e = err_text(build_cache(
        &teacher,
        &data,
        &out,
        &CacheConfig::top_k(2).with_shard_size(16),
        8,
        CPU,
    ));
    assert!(e.contains("top_k") && e.contains("dtype"), "{e}");
    assert_eq!(listing(&out), before);

    // The same for a partial build (no manifest yet): the shards' own metadata and
    // build.json say who made them.
    let part = dir.path().join("part");
    let failing = Counting::new(&teacher, Some(3));
    assert!(build_cache(&failing, &data, &part, &cfg(), 8, CPU).is_err());
    assert!(part.join(shard_file_name(0)).exists() && !part.join(MANIFEST_FILE).exists());
    let before = listing(&part);
    let e = err_text(build_cache(&other_teacher, &data, &part, &cfg(), 8, CPU));
    assert!(e.contains("teacher (fingerprint)"), "{e}");
    std::fs::remove_file(part.join(BUILD_FILE)).unwrap();
    let before_shards = listing(&part);
    let e = err_text(build_cache(&other_teacher, &data, &part, &cfg(), 8, CPU));
    assert!(
        e.contains(&shard_file_name(0)) && e.contains("teacher (fingerprint)"),
        "{e}"
    );
    assert_eq!(listing(&part), before_shards);
    assert_eq!(before.len(), before_shards.len() + 1);

    // A folder holding other files is not taken over.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let e = err_text(build_cache(&teacher, &data, &foreign, &cfg(), 8, CPU));
    assert!(e.contains("notes.txt"), "{e}");
    assert_eq!(listing(&foreign).len(), 1);
}

#[test]
fn truncated_or_corrupt_shards_are_caught_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cache");
    let (teacher, data) = (classifier(7, 3), TokenData::new(40, 8, 6));
    let m = build_cache(&teacher, &data, &out, &cfg(), 8, CPU).unwrap();
    let shard1 = out.join(shard_file_name(1));
    let bytes = std::fs::read(&shard1).unwrap();
    std::fs::write(&shard1, &bytes[..bytes.len() - 10]).unwrap();
    let e = err_text(TeacherCache::open(&out, None, None));
    let (want, found) = (bytes.len().to_string(), (bytes.len() - 10).to_string());
    assert!(
        e.contains("shard-00001.safetensors") && e.contains(&want) && e.contains(&found),
        "{e}"
    );
    // Rebuilding re-runs the teacher over that shard only (2 batches of 8).
    let counting = Counting::new(&teacher, None);
    let again = build_cache(&counting, &data, &out, &cfg(), 8, CPU).unwrap();
    assert_eq!(counting.calls.get(), 2);
    assert_eq!(again, m);
    TeacherCache::open(&out, None, None)
        .unwrap()
        .verify()
        .unwrap();

    // A flipped byte keeps the size: verify() catches it by its hash, and a build
    // replaces the shard (its header no longer parses, or its values differ).
    let mut bad = bytes.clone();
    bad[4] ^= 0xff;
    std::fs::write(&shard1, &bad).unwrap();
    let cache = TeacherCache::open(&out, None, None).unwrap();
    let e = err_text(cache.verify());
    assert!(e.contains("shard-00001") && e.contains("SHA-256"), "{e}");
    let e = err_text(cache.lookup(&[20], CPU));
    assert!(e.contains("shard-00001"), "{e}");
    let again = build_cache(&teacher, &data, &out, &cfg(), 8, CPU).unwrap();
    assert_eq!(again, m);
    // A flipped byte among the values of a partial build's shard (no manifest to compare
    // with): the shard's own tensor hash gives it away and it is rebuilt.
    std::fs::remove_file(out.join(MANIFEST_FILE)).unwrap();
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    std::fs::write(&shard1, &bad).unwrap();
    let counting = Counting::new(&teacher, None);
    assert_eq!(
        build_cache(&counting, &data, &out, &cfg(), 8, CPU).unwrap(),
        m
    );
    assert_eq!(counting.calls.get(), 2);

    // A missing shard is named too.
    std::fs::remove_file(out.join(shard_file_name(2))).unwrap();
    let e = err_text(TeacherCache::open(&out, None, None));
    assert!(e.contains("shard-00002.safetensors"), "{e}");
}

fn mtimes(dir: &Path, shards: &[usize]) -> Vec<(PathBuf, SystemTime)> {
    shards
        .iter()
        .map(|&s| {
            let p = dir.join(shard_file_name(s));
            let t = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p, t)
        })
        .collect()
}

#[test]
fn an_interrupted_build_resumes_to_the_uninterrupted_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, data) = (classifier(8, 6), TokenData::new(50, 9, 7));
    let c = CacheConfig::top_k(2).with_shard_size(16).with_pooled(true);
    let whole = dir.path().join("whole");
    let m = build_cache(&teacher, &data, &whole, &c, 8, CPU).unwrap();

    // 7 batches in all (2 per full shard, 1 for the last); crash in the 5th.
    let part = dir.path().join("part");
    let failing = Counting::new(&teacher, Some(4));
    let e = err_text(build_cache(&failing, &data, &part, &c, 8, CPU));
    assert!(e.contains("simulated crash"), "{e}");
    assert!(part.join(shard_file_name(1)).exists());
    assert!(!part.join(shard_file_name(2)).exists());
    assert!(!part.join(MANIFEST_FILE).exists() && part.join(BUILD_FILE).exists());
    no_temp_files(&part);
    let e = err_text(TeacherCache::open(&part, None, None));
    assert!(
        e.contains("build.json") || e.contains("not finished"),
        "{e}"
    );
    // A writer killed mid-file leaves a temporary file: the resumed build removes it.
    std::fs::write(part.join(".shard-00002.safetensors.tmp-99999-0"), b"half").unwrap();

    let kept = mtimes(&part, &[0, 1]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let counting = Counting::new(&teacher, None);
    let resumed = build_cache(&counting, &data, &part, &c, 8, CPU).unwrap();
    assert_eq!(counting.calls.get(), 3, "only shards 2 and 3 are built");
    assert_eq!(
        mtimes(&part, &[0, 1]),
        kept,
        "complete shards were rewritten"
    );
    assert_eq!(resumed, m);
    assert!(!part.join(BUILD_FILE).exists());
    no_temp_files(&part);
    for s in 0..m.shards.len() {
        let f = shard_file_name(s);
        assert_eq!(
            std::fs::read(part.join(&f)).unwrap(),
            std::fs::read(whole.join(&f)).unwrap(),
            "{f}"
        );
    }
    let a = TeacherCache::open(&part, None, None).unwrap();
    let got = a.lookup(&SHUFFLED, CPU).unwrap();
    assert_eq!(got.topk_logprobs.unwrap().size(), [9, 2]);
    assert_eq!(got.pooled.unwrap().size(), [9, 16]);

    // A crash before the first shard completes leaves nothing behind.
    let early = dir.path().join("early");
    let failing = Counting::new(&teacher, Some(1));
    assert!(build_cache(&failing, &data, &early, &c, 8, CPU).is_err());
    assert!(!early.exists());
}
