//! Students cut from their teacher: the cut computes exactly what the teacher's
//! embeddings and chosen layers compute, bad layer lists are clear errors that write
//! nothing, and the saved folder loads back through core's loader.

use std::path::Path;

use reuse_core::models::bert::{Bert, BertConfig, EncoderOutput};
use reuse_core::ForwardOptions;
use reuse_core::{Checkpoint, Model};
use reuse_distill::student::{cut_layers, save_student_folder};
use tch::{Device, Kind, Tensor};

/// A tiny random 4-layer BERT with a pooler.
fn teacher() -> Bert {
    tch::manual_seed(7);
    let cfg = BertConfig::tiny(50, 16, 4);
    let mut ck = Bert::random(cfg.clone(), Device::Cpu).unwrap().state_dict();
    ck.insert(
        "pooler.dense.weight",
        Tensor::randn([16, 16], (Kind::Float, Device::Cpu)),
    );
    ck.insert(
        "pooler.dense.bias",
        Tensor::randn([16], (Kind::Float, Device::Cpu)),
    );
    Bert::from_checkpoint(cfg, &mut ck, Device::Cpu, Kind::Float).unwrap()
}

/// Token ids `[3, 7]` with the last two positions of the second row padded.
fn inputs() -> (Tensor, Tensor) {
    tch::manual_seed(1);
    let ids = Tensor::randint_low(1, 50, [3, 7], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([3, 7], (Kind::Int64, Device::Cpu));
    let _ = mask.get(1).narrow(0, 5, 2).fill_(0);
    (ids, mask)
}

fn run(m: &Bert) -> EncoderOutput {
    let (ids, mask) = inputs();
    let want = ForwardOptions {
        hidden_states: true,
        attentions: true,
        ..Default::default()
    };
    tch::no_grad(|| m.forward(&ids, Some(&mask), None, false, want).unwrap())
}

fn assert_same(a: &[Tensor], b: &[Tensor], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: count");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.equal(y), "{what} {i} differ");
    }
}

#[test]
fn cut_equals_the_teachers_embeddings_and_chosen_layers_run_by_hand() {
    let t = teacher();
    let s = cut_layers(&t, &[0, 2]).unwrap();
    assert_eq!(s.layers.len(), 2);
    assert_eq!(s.config.num_hidden_layers, 2);
    // By hand: a fresh copy of the teacher whose layer list is its layers 0 and 2.
    let mut hand = Bert::from_checkpoint(
        t.config.clone(),
        &mut t.state_dict(),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let l0 = hand.layers.remove(0);
    let l2 = hand.layers.remove(1);
    hand.layers = vec![l0, l2];
    let (a, b) = (run(&s), run(&hand));
    assert_same(&a.hidden_states, &b.hidden_states, "hidden state");
    assert_same(&a.attentions, &b.attentions, "attention");
    assert!(a.last_hidden_state.equal(&b.last_hidden_state));
    // The embedding output and layer 0 are the teacher's own; layer 1 is not the
    // teacher's layer 1.
    let tt = run(&t);
    assert!(a.hidden_states[0].equal(&tt.hidden_states[0]));
    assert!(a.hidden_states[1].equal(&tt.hidden_states[1]));
    assert!(!a.hidden_states[2].equal(&tt.hidden_states[2]));
    // Weights are named by their new index; the pooler came along.
    let ss = s.state_dict();
    let ts = t.state_dict();
    assert!(ss
        .tensor("encoder.layer.1.attention.self.query.weight")
        .unwrap()
        .equal(
            ts.tensor("encoder.layer.2.attention.self.query.weight")
                .unwrap()
        ));
    assert!(ss.get("encoder.layer.2.output.dense.weight").is_none());
    assert!(ss
        .tensor("pooler.dense.weight")
        .unwrap()
        .equal(ts.tensor("pooler.dense.weight").unwrap()));
    // Copies: training the student leaves the teacher alone; they are trainable.
    let w = &s.layers[0].query.weight;
    assert!(w.requires_grad());
    tch::no_grad(|| {
        let _ = w.shallow_clone().fill_(0.0);
    });
    assert!(
        t.layers[0]
            .query
            .weight
            .abs()
            .sum(Kind::Float)
            .double_value(&[])
            > 0.0
    );
}

#[test]
fn keeping_every_layer_reproduces_the_teacher_exactly() {
    let t = teacher();
    let s = cut_layers(&t, &[0, 1, 2, 3]).unwrap();
    let (a, b) = (run(&s), run(&t));
    assert_same(&a.hidden_states, &b.hidden_states, "hidden state");
    assert!(a.last_hidden_state.equal(&b.last_hidden_state));
    let (ss, ts) = (s.state_dict(), t.state_dict());
    assert_eq!(
        ss.names().collect::<Vec<_>>(),
        ts.names().collect::<Vec<_>>()
    );
    for (n, x) in ss.iter() {
        assert!(x.equal(ts.tensor(n).unwrap()), "{n}");
    }
    assert_eq!(s.config, t.config);
}

/// Writes `t` as a model folder with a config key reuse does not read and stand-ins for
/// the tokenizer and sentence-transformers files.
fn teacher_folder(t: &Bert, dir: &Path) {
    let mut t_cfg = t.config.clone();
    t_cfg
        .extra
        .insert("architectures".into(), serde_json::json!(["BertModel"]));
    t_cfg
        .extra
        .insert("some_future_key".into(), serde_json::json!({"a": [1, 2]}));
    std::fs::create_dir_all(dir).unwrap();
    t.state_dict().save(dir.join("model.safetensors")).unwrap();
    t_cfg.save(&dir.join("config.json")).unwrap();
    for f in ["tokenizer.json", "vocab.txt", "sentence_bert_config.json"] {
        std::fs::write(dir.join(f), format!("{f} of the teacher")).unwrap();
    }
    std::fs::write(
        dir.join("modules.json"),
        r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]"#,
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        "{\"pooling_mode_mean_tokens\": true}",
    )
    .unwrap();
    std::fs::write(dir.join("README.md"), "the teacher's card").unwrap();
}

#[test]
fn bad_layer_lists_are_clear_errors_and_write_nothing() {
    let t = teacher();
    let dir = tempfile::tempdir().unwrap();
    let tdir = dir.path().join("teacher");
    teacher_folder(&t, &tdir);
    let out = dir.path().join("student");
    for (layers, needles) in [
        (vec![0, 4], vec!["layer index 4", "4 layers"]),
        (vec![0, 9], vec!["layer index 9", "4 layers"]),
        (vec![2, 1], vec!["strictly increasing", "1 follows 2"]),
        (vec![1, 1], vec!["strictly increasing"]),
        (vec![], vec!["no layers"]),
    ] {
        let err = cut_layers(&t, &layers)
            .and_then(|s| save_student_folder(&s, &tdir, &out, false))
            .unwrap_err()
            .to_string();
        for n in needles {
            assert!(err.contains(n), "{layers:?}: {err}");
        }
        assert!(!out.exists(), "{layers:?}: out was created");
    }
    // Only the teacher folder is there: no temporary folder was left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["teacher"]);
}

#[test]
fn saved_folder_round_trips_and_keeps_the_teachers_files() {
    let t = teacher();
    let dir = tempfile::tempdir().unwrap();
    let tdir = dir.path().join("teacher");
    teacher_folder(&t, &tdir);
    let s = cut_layers(&t, &[1, 3]).unwrap();
    let out = dir.path().join("nested/student");
    save_student_folder(&s, &tdir, &out, false).unwrap();
    // Core's loader gives the same function.
    let back = Bert::load(&out, Device::Cpu, Kind::Float).unwrap();
    let (a, b) = (run(&s), run(&back));
    assert_same(&a.hidden_states, &b.hidden_states, "hidden state");
    assert!(back.pooler.is_some());
    // config.json: the teacher's, with only the depth changed (unknown keys kept).
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (mut tc, sc) = (
        read(&tdir.join("config.json")),
        read(&out.join("config.json")),
    );
    assert_eq!(sc["num_hidden_layers"], 2);
    tc["num_hidden_layers"] = serde_json::json!(2);
    assert_eq!(sc, tc);
    // Tokenizer and sentence-transformers files copied; the teacher's card is not.
    for f in [
        "tokenizer.json",
        "vocab.txt",
        "sentence_bert_config.json",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(tdir.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!out.join("README.md").exists());
    // Hugging Face names, exactly the cut's tensors.
    let ck = Checkpoint::load(out.join("model.safetensors"), Device::Cpu).unwrap();
    assert_eq!(
        ck.names().collect::<Vec<_>>(),
        s.state_dict().names().collect::<Vec<_>>()
    );
    assert_eq!(s.params().count(), back.params().count());
    // A non-empty `out` is refused and left as it was, unless overwriting is asked for.
    let other = cut_layers(&t, &[0]).unwrap();
    let err = save_student_folder(&other, &tdir, &out, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(read(&out.join("config.json"))["num_hidden_layers"], 2);
    save_student_folder(&other, &tdir, &out, true).unwrap();
    assert_eq!(read(&out.join("config.json"))["num_hidden_layers"], 1);
    assert_eq!(
        std::fs::read_dir(out.parent().unwrap()).unwrap().count(),
        1,
        "temporary folders left behind"
    );
    // An empty `out` is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    save_student_folder(&other, &tdir, &empty, false).unwrap();
    assert!(empty.join("model.safetensors").exists());
}

#[test]
fn a_student_that_is_not_the_teachers_shape_is_refused() {
    let t = teacher();
    let dir = tempfile::tempdir().unwrap();
    let tdir = dir.path().join("teacher");
    teacher_folder(&t, &tdir);
    let wide = Bert::random(BertConfig::tiny(50, 32, 2), Device::Cpu).unwrap();
    let out = dir.path().join("student");
    let err = save_student_folder(&wide, &tdir, &out, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("hidden_size is 32"), "{err}");
    assert!(!out.exists());
}
