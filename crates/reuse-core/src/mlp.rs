//! A multi-layer perceptron for small data, and a classification head.

use tch::{Device, Tensor};

use crate::data::Batch;
use crate::model::ForwardOptions;
use crate::model::{prefixed, Activation, Model, StepOutputs, Trainable};
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
        if !keep_hidden && (self.dropout == 0.0 || !train) {
            if let Some(out) = self.fused_relu(x)? {
                return Ok((out, Vec::new()));
            }
        }
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
    /// The output through the ReLU MLP node (`cpp/mlp_shim.cpp`: the whole MLP as one
    /// autograd node, the same arithmetic with less bookkeeping), when it applies: ReLU,
    /// every layer a plain `x W^T + b` ([`Linear::plain_dense`]), a 2-D input and
    /// weights of its dtype and device, no autocast. `None`: use the layer-by-layer path.
    fn fused_relu(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.activation != Activation::Relu || x.dim() != 2 {
            return Ok(None);
        }
        let mut ws = Vec::with_capacity(self.layers.len());
        let mut bs = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let Some((w, b)) = l.plain_dense() else {
                return Ok(None);
            };
            if w.kind() != x.kind() || b.kind() != x.kind() || w.device() != x.device() {
                return Ok(None);
            }
            ws.push(w);
            bs.push(b);
        }
        // Shapes: the first layer checks the input; the layers were built to chain.
        self.layers[0].check_input(x)?;
        crate::shim::relu_mlp(x, &ws, &bs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The MLP computed op by op through autograd (the reference for the fused node).
    fn reference(m: &Mlp, x: &Tensor) -> Tensor {
        let n = m.layers.len();
        let mut h = x.shallow_clone();
        for (i, l) in m.layers.iter().enumerate() {
            h = h.linear(&l.weight, l.bias.as_ref());
            if i + 1 < n {
                h = h.relu();
            }
        }
        h
    }

    fn grads(m: &Mlp) -> Vec<Tensor> {
        m.named_parameters()
            .iter()
            .map(|(_, p)| {
                let g = p.grad();
                if g.defined() {
                    g.copy()
                } else {
                    Tensor::new()
                }
            })
            .collect()
    }

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        assert_eq!(a.size(), b.size(), "{what}: shapes");
        let diff = (a - b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]).max(1e-6);
        assert!(
            diff <= 1e-5 * scale,
            "{what}: max |diff| {diff} at scale {scale}"
        );
    }

    #[test]
    fn the_fused_relu_node_matches_autograd_op_by_op() {
        tch::manual_seed(3);
        let m = Mlp::new(&[7, 16, 12, 5], Activation::Relu, Device::Cpu).unwrap();
        let x = Tensor::randn([9, 7], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = Tensor::randint(5, [9], (Kind::Int64, Device::Cpu));
        // Through the fused node (Mlp::forward takes it for a plain ReLU MLP).
        let out = m.forward(&x, true).unwrap();
        assert!(
            m.fused_relu(&x).unwrap().is_some(),
            "a plain ReLU MLP takes the fused node"
        );
        out.cross_entropy_for_logits(&y).backward();
        let fused_grads = grads(&m);
        let fused_x = x.grad().copy();
        m.params().zero_grad();
        let mut xg = x.grad();
        let _ = xg.zero_();
        let want = reference(&m, &x);
        close(&out, &want, "output");
        want.cross_entropy_for_logits(&y).backward();
        for ((name, _), (f, r)) in m
            .named_parameters()
            .iter()
            .zip(fused_grads.iter().zip(grads(&m)))
        {
            close(f, &r, name);
        }
        close(&fused_x, &x.grad(), "input gradient");
    }

    #[test]
    fn the_fused_node_leaves_frozen_layers_without_gradients_and_retains_its_graph() {
        tch::manual_seed(4);
        let m = Mlp::new(&[6, 10, 4], Activation::Relu, Device::Cpu).unwrap();
        let _ = m.layers[0].weight.shallow_clone().set_requires_grad(false);
        let _ = m.layers[0]
            .bias
            .as_ref()
            .unwrap()
            .shallow_clone()
            .set_requires_grad(false);
        let x = Tensor::randn([5, 6], (Kind::Float, Device::Cpu));
        let out = m.forward(&x, true).unwrap();
        let loss = out.square().sum(Kind::Float);
        let w1 = m.layers[1].weight.shallow_clone();
        // Twice over the same graph (as EWC's exact Fisher does with keep_graph).
        let a = Tensor::run_backward(&[&loss], &[&w1], true, false);
        let b = Tensor::run_backward(&[&loss], &[&w1], true, false);
        close(&a[0], &b[0], "second pass");
        let want = reference(&m, &x).square().sum(Kind::Float);
        let r = Tensor::run_backward(&[&want], &[&w1], false, false);
        close(&a[0], &r[0], "layers.1.weight");
        loss.backward();
        assert!(!m.layers[0].weight.grad().defined());
        assert!(m.layers[1].weight.grad().defined());
        // Without gradients recorded, the same values and no graph.
        let plain = tch::no_grad(|| m.forward(&x, false).unwrap());
        assert!(!plain.requires_grad());
        close(&plain, &out.detach(), "no-grad output");
    }

    #[test]
    fn a_wrong_input_width_is_an_error_on_the_fused_path() {
        let m = Mlp::new(&[6, 10, 4], Activation::Relu, Device::Cpu).unwrap();
        let x = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
        let err = m.forward(&x, true).unwrap_err().to_string();
        assert!(err.contains("in_features 6"), "{err}");
    }
}
