//! Text classification: [`BertClassifier`], BERT with mean pooling and a linear head.

use tch::{Kind, Tensor};

use super::bert::{mean_pool, Bert};
use crate::data::Batch;
use crate::model::{ForwardOptions, Model, StepOutputs, Trainable};
use crate::{ClassificationHead, Error, Linear, OutputSlots, Result};

/// BERT, mean pooling and a classification head (`classifier`): text classification.
#[derive(Debug)]
pub struct BertClassifier {
    /// The encoder.
    pub bert: Bert,
    /// The head, addressed as `classifier`.
    pub head: ClassificationHead,
}

impl BertClassifier {
    /// A new head of `num_classes` on `bert` (dropout = the config's hidden dropout).
    pub fn new(bert: Bert, num_classes: i64) -> Self {
        let head = ClassificationHead::new(
            bert.config.hidden_size,
            num_classes,
            bert.config.hidden_dropout_prob,
            bert.device(),
        );
        Self { bert, head }
    }

    /// Logits `[b, classes]` (f32) and, as asked, hidden states, attentions and the
    /// pooled features. `mask` is `None` when no example is padded.
    pub fn run(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
        opts: ForwardOptions,
    ) -> Result<StepOutputs> {
        let want = opts;
        let out = self.bert.forward(ids, mask, None, train, want)?;
        let pooled = mean_pool(&out.last_hidden_state, mask);
        let logits = self
            .head
            .forward(&pooled.to_kind(self.head.classifier.weight.kind()), train)?
            .to_kind(Kind::Float);
        Ok(StepOutputs {
            last_hidden: None,
            logits,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
            pooled: opts.pooled.then_some(pooled),
        })
    }

    /// Logits `[b, classes]` (f32).
    pub fn logits(&self, ids: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        Ok(self
            .run(ids, mask, train, ForwardOptions::default())?
            .logits)
    }
}

impl Model for BertClassifier {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.bert.visit_linears(f);
        self.head.visit_linears(f);
    }

    fn visit_block_outputs(&mut self, f: &mut dyn FnMut(&str, &mut OutputSlots)) {
        self.bert.visit_block_outputs(f);
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = self.bert.named_parameters();
        v.extend(self.head.named_parameters());
        v
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let mut v = self.bert.named_buffers();
        v.extend(self.head.named_buffers());
        v
    }
}

impl Trainable for BertClassifier {
    fn forward(&self, batch: &Batch, train: bool, opts: ForwardOptions) -> Result<StepOutputs> {
        let mask = batch
            .mask
            .as_ref()
            .ok_or_else(|| Error::invalid("batch", "BERT needs an attention mask"))?;
        self.run(&batch.inputs, batch.padded.then_some(mask), train, opts)
    }
}
