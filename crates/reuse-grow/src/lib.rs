//! Model growth (planned): Net2WiderNet / Net2DeeperNet and transformer block expansion as checkpoint transforms that preserve the function of a trained model.
//!
//! This crate is a placeholder in the workspace layout; its API arrives with its issue.
#![deny(missing_docs)]
