//! Prediction, accuracy and each model's own evaluation over a data source (eval mode,
//! no gradient).

use tch::Device;

use crate::data::{epoch_batches, BatchSource};
use crate::model::ForwardOptions;
use crate::model::{Evaluation, Trainable};
use crate::Result;

/// Predicted classes and labels for every example of `data`, in order (eval mode, no grad).
pub fn predict(
    model: &dyn Trainable,
    data: &dyn BatchSource,
    batch_size: usize,
    device: Device,
) -> Result<(Vec<i64>, Vec<i64>)> {
    let mut preds = Vec::with_capacity(data.len());
    let mut labels = Vec::with_capacity(data.len());
    tch::no_grad(|| -> Result<()> {
        for idx in epoch_batches(data.len(), batch_size, None, 0) {
            let b = data.batch(&idx, device)?;
            let out = model.forward(&b, false, ForwardOptions::default())?;
            preds.extend(Vec::<i64>::try_from(
                out.logits.argmax(-1, false).to_device(Device::Cpu),
            )?);
            labels.extend(Vec::<i64>::try_from(b.labels.to_device(Device::Cpu))?);
        }
        Ok(())
    })?;
    Ok((preds, labels))
}

/// Examples of `data` whose predicted class equals the label, and how many were read.
pub fn count_correct(
    model: &dyn Trainable,
    data: &dyn BatchSource,
    batch_size: usize,
    device: Device,
) -> Result<(usize, usize)> {
    let (preds, labels) = predict(model, data, batch_size, device)?;
    let right = preds.iter().zip(&labels).filter(|(p, y)| p == y).count();
    Ok((right, labels.len()))
}

/// Fraction of examples whose predicted class equals the label.
pub fn accuracy(
    model: &dyn Trainable,
    data: &dyn BatchSource,
    batch_size: usize,
    device: Device,
) -> Result<f64> {
    let (right, total) = count_correct(model, data, batch_size, device)?;
    Ok(right as f64 / total.max(1) as f64)
}

/// The model's own figure on `data` ([`Trainable::evaluate`]: mean token NLL for causal
/// LMs), or accuracy for a model that has none.
pub fn evaluate(
    model: &dyn Trainable,
    data: &dyn BatchSource,
    batch_size: usize,
    device: Device,
) -> Result<Evaluation> {
    match model.evaluate(data, batch_size, device)? {
        Some(e) => Ok(e),
        None => Ok(Evaluation::Accuracy(accuracy(
            model, data, batch_size, device,
        )?)),
    }
}
