//! Fine-tune all-MiniLM-L6-v2 + a head on the Debian sections fixture, with a custom
//! technique in the loop (the README example; `cargo run --release -p reuse-core --example finetune_sections`).

use reuse_core::data::load_text_splits;
use reuse_core::models::{Bert, BertClassifier, SentenceEncoder, TokenizedDataset};
use reuse_core::trainer::StepContext;
use reuse_core::{trainer, Params, Result, Technique, TrainConfig, Trainer};
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::{Device, Kind};

struct FreezeEmbeddings;
impl Technique for FreezeEmbeddings {
    fn name(&self) -> &str {
        "freeze-embeddings"
    }
    fn after_backward(&mut self, params: &Params, _ctx: &StepContext) -> Result<()> {
        for (name, p) in params.iter().filter(|(n, _)| n.starts_with("embeddings.")) {
            let _ = (name, p.grad().zero_());
        }
        Ok(())
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let data = load_text_splits(&fixtures_dir().join("debian_sections/sections.tsv.gz"))?;
    let dir = minilm_dir()?;
    let enc = SentenceEncoder::load(&dir, Device::Cpu, Kind::Float)?;
    let train = TokenizedDataset::new(&enc.tokenizer, &data.train, 32)?;
    let test = TokenizedDataset::new(&enc.tokenizer, &data.test, 32)?;
    let model = BertClassifier::new(Bert::load(&dir, Device::Cpu, Kind::Float)?, 8);
    let mut t = Trainer::new(TrainConfig {
        max_steps: Some(200),
        batch_size: 16,
        lr: 1e-4,
        ..Default::default()
    });
    t.fit(&model, &train, None, &mut [&mut FreezeEmbeddings])?;
    println!(
        "accuracy {:.3}",
        trainer::accuracy(&model, &test, 64, Device::Cpu)?
    );
    Ok(())
}
