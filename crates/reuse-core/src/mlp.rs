//! A multi-layer perceptron for small data, and a classification head.

use tch::{Device, Tensor};

use crate::data::Batch;
use crate::model::{prefixed, Activation, Model};
use crate::trainer::{ForwardOptions, StepOutputs, Trainable};
use crate::{Error, Linear, Result};

/// Linears `layers.0 .. layers.{n-1}` with an activation between them (none after the last).
#[derive(Debug)]
pub struct Mlp {
    /// The layers, addressed as `layers.{i}`.
    pub layers: Vec<Linear>,
    /// Applied after every layer but the last.
    pub activation: Activation,
    /// Dropout probability after each activation (training only).
    pub dropout: f64,
}

impl Mlp {
    /// An MLP with `widths = [in, hidden..., out]`, initialised as PyTorch does.
    pub fn new(widths: &[i64], activation: Activation, device: Device) -> Result<Self> {
        if widths.len() < 2 {
            return Err(Error::invalid(
                "mlp widths",
                format!("need at least [in, out], found {widths:?}"),
            ));
        }
        let layers = widths
            .windows(2)
            .map(|w| Linear::new(w[0], w[1], true, device))
            .collect();
        Ok(Self {
            layers,
            activation,
            dropout: 0.0,
        })
    }

    /// Sets the dropout probability.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    /// The output for `x` `[batch, in]`; an input of the wrong width is an error.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.run(x, train, false)?.0)
    }

    /// The output and, with `keep_hidden`, the input and each hidden layer's output after
    /// its activation (and dropout).
    fn run(&self, x: &Tensor, train: bool, keep_hidden: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let n = self.layers.len();
        let mut h = x.shallow_clone();
        let mut hidden = Vec::new();
        if keep_hidden {
            hidden.push(h.shallow_clone());
        }
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h, train)?;
            if i + 1 < n {
                h = self.activation.apply(&h);
                if self.dropout > 0.0 {
                    h = h.dropout(self.dropout, train);
                }
                if keep_hidden {
                    hidden.push(h.shallow_clone());
                }
            }
        }
        Ok((h, hidden))
    }
}

impl Model for Mlp {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            f(&format!("layers.{i}"), l);
        }
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| prefixed(&format!("layers.{i}"), l.named_parameters()))
            .collect()
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| prefixed(&format!("layers.{i}"), l.named_buffers()))
            .collect()
    }
}

/// An MLP classifies its batch's `inputs` directly; `hidden_states` on request are the
/// input and each hidden layer's output after its activation.
impl Trainable for Mlp {
    fn forward(&self, batch: &Batch, train: bool, opts: ForwardOptions) -> Result<StepOutputs> {
        let (logits, hidden) = self.run(&batch.inputs, train, opts.hidden_states)?;
        let mut out = StepOutputs::logits(logits);
        out.hidden_states = hidden;
        Ok(out)
    }
}

/// Dropout then a linear `classifier` from features to class logits, as
/// `BertForSequenceClassification` does on top of its pooled output.
#[derive(Debug)]
pub struct ClassificationHead {
    /// The output layer, addressed as `classifier`.
    pub classifier: Linear,
    /// Dropout on the features (training only).
    pub dropout: f64,
}

impl ClassificationHead {
    /// A head from `in_features` to `num_classes`.
    pub fn new(in_features: i64, num_classes: i64, dropout: f64, device: Device) -> Self {
        Self {
            classifier: Linear::new(in_features, num_classes, true, device),
            dropout,
        }
    }

    /// Logits for features `[batch, in]`.
    pub fn forward(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        let h = if self.dropout > 0.0 {
            features.dropout(self.dropout, train)
        } else {
            features.shallow_clone()
        };
        self.classifier.forward(&h, train)
    }
}

impl Model for ClassificationHead {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        f("classifier", &mut self.classifier);
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        prefixed("classifier", self.classifier.named_parameters())
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        prefixed("classifier", self.classifier.named_buffers())
    }
}
