//! reuse-grow: make a trained model bigger without losing what it learned.
//!
//! A bigger model that starts from a smaller trained one — computing exactly the same
//! function at step 0 — can reach its target loss with less compute than one trained
//! from scratch (bert2BERT, LiGO, G_stack). Growth here is a transform from one
//! checkpoint + config to a bigger one:
//!
//! * [`plan`]: a [`Growth`] says, for every grown tensor, which source tensor it reads
//!   and how each axis is gathered and scaled; [`Growth::apply`] grows a checkpoint and
//!   [`Growth::apply_optimizer_state`] carries an optimizer's moments into the grown
//!   parameters, so a run continues without a restart.
//! * [`bert`]: BERT wider (FFN inner size, hidden size, heads; all exact) and deeper
//!   (gated layers, exact; copied or stacked layers, loadable by Hugging Face,
//!   approximate).
//! * [`mlp`]: Net2WiderNet and Net2DeeperNet for core's [`reuse_core::Mlp`].
//! * [`verify`]: the grown model against the original, max |diff| and embedding cosine.
//! * [`folder`]: a model folder in, a complete grown model folder out (what
//!   `reuse grow` runs), loadable by `transformers` and `sentence-transformers` where the
//!   operator allows.
//!
//! ```no_run
//! use std::path::Path;
//! use reuse_grow::bert::{DeepenBert, DepthMethod, WidenBert};
//! use reuse_grow::folder::{grow_folder, FolderGrowth};
//!
//! # fn main() -> reuse_core::Result<()> {
//! // MiniLM's FFN from 1536 to 3072 units: the same embeddings, more capacity.
//! let wide = FolderGrowth::Width(WidenBert { intermediate_size: Some(3072), ..Default::default() });
//! let report = grow_folder(Path::new("all-MiniLM-L6-v2"), Path::new("minilm-wide"), &wide, 0.0, false)?;
//! assert!(report.verification.random.max_abs_diff < 1e-4);
//! // And from 6 to 12 layers behind gates at 0 (exact, loads in reuse).
//! let deep = FolderGrowth::Depth(DeepenBert { layers: 12, method: DepthMethod::Gated, every: None });
//! grow_folder(Path::new("minilm-wide"), Path::new("minilm-deep"), &deep, 0.0, false)?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod bert;
pub mod folder;
pub mod mlp;
pub mod plan;
pub mod verify;

pub use plan::{Axis, Growth, Source};
