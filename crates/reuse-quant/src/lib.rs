//! reuse-quant: int8 and int4 weights for deployment, and a quantized base to train
//! adapters on.
//!
//! A trained model's linear weights, stored as 8- or 4-bit integer codes with a scale
//! per output row or per group of inputs, take a quarter or an eighth of the memory and
//! disk of f32. This crate:
//!
//! * [`spec`]: what a quantized weight holds ([`QuantSpec`]: bits, group size,
//!   symmetric or with zero points);
//! * [`weight`]: [`QuantizedWeight`], the [`reuse_core::WeightStorage`] that core's
//!   `Linear` holds in place of a dense weight (codes, scales and zero points are
//!   buffers, never trainable parameters), quantized by round-to-nearest;
//! * [`gptq`]: GPTQ's error-compensating quantization (Frantar et al., ICLR 2023), which
//!   uses a few hundred real inputs to keep each layer's *output* close, where
//!   round-to-nearest only keeps each weight close. Int4 needs it: round-to-nearest
//!   int4 loses too much on MiniLM.
//! * [`model`]: a whole model's linears quantized in place ([`model::quantize_model`]),
//!   with GPTQ's Hessians gathered by running it on calibration inputs
//!   ([`model::calibrate`]);
//! * [`layout`]: the safetensors layout and `config.json` entry of a quantized model
//!   folder, and the loader that lets core's model loaders read it ([`STORAGE`], [`load_options`]: passed explicitly, nothing global);
//! * [`folder`]: a model folder in, a quantized model folder out (`reuse quantize`).
//!
//! ```
//! use reuse_quant::{gptq, QuantSpec, QuantizedWeight};
//! use reuse_core::WeightStorage;
//! use tch::{Device, Kind, Tensor};
//!
//! # fn main() -> reuse_core::Result<()> {
//! let w = Tensor::randn([64, 128], (Kind::Float, Device::Cpu));
//! // Per-channel int8: every weight within half a step of its value.
//! let q8 = QuantizedWeight::quantize(&w, QuantSpec::int8())?;
//! let step = q8.scale().max().double_value(&[]);
//! assert!((q8.dequantize() - &w).abs().max().double_value(&[]) <= step / 2.0 + 1e-6);
//! // Int4 in groups of 32 with zero points, by GPTQ on calibration inputs.
//! let x = Tensor::randn([512, 128], (Kind::Float, Device::Cpu));
//! let mut h = gptq::Hessian::new(128, Device::Cpu);
//! h.add(&x)?;
//! let q4 = gptq::quantize("w", &w, &h.matrix(), QuantSpec::int4(32, false), &Default::default())?;
//! assert_eq!(q4.qweight().size(), [64, 64]); // two codes per byte
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod folder;
pub mod gptq;
pub mod layout;
pub mod model;
pub mod spec;
pub mod weight;

pub use layout::{load_options, STORAGE};
pub use spec::QuantSpec;
pub use weight::QuantizedWeight;
