//! The options that say how a labelled data file is read: shared by `lora train`,
//! `distill cache` and `distill lm`, so they read a file the same way (a cache must see
//! the examples the student trains on).

use anyhow::Result;
use reuse_core::data::labelled::LabelledOptions;

/// Columns and hold-out of a labelled data file (see `reuse_core::data::labelled`).
#[derive(clap::Args, Debug, Clone)]
pub struct Columns {
    /// The column (JSON key) holding the text.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// The column (JSON key) holding the label.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// The column holding each row's split (train, dev or validation, test); default: a
    /// column named `split` if there is one, else dev and test are held out by --seed.
    #[arg(long)]
    pub split_column: Option<String>,
    /// Fraction held out for dev when the data has no split column.
    #[arg(long, default_value_t = 0.1)]
    pub dev_fraction: f64,
    /// Fraction held out for test when the data has no split column.
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f64,
    /// Hold out the same fraction of every class.
    #[arg(long)]
    pub stratify: bool,
}

impl Columns {
    /// The loader's options, with the file format (`None`: from the extension) and the
    /// seed of the hold-out.
    pub fn options(&self, format: Option<&str>, seed: u64) -> Result<LabelledOptions> {
        Ok(LabelledOptions {
            format: format.map(str::parse).transpose()?,
            text_column: self.text_column.clone(),
            label_column: self.label_column.clone(),
            split_column: self.split_column.clone(),
            dev_fraction: self.dev_fraction,
            test_fraction: self.test_fraction,
            stratify: self.stratify,
            seed,
        })
    }
}

/// Prompt / response pairs of causal-LM data (`lora train --task causal-lm`, `distill lm`,
/// `distill cache` on a causal LM): giving neither column trains on `--text-column`
/// texts packed into blocks.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Pairs {
    /// Causal LM: the column (JSON key) of the prompts (default `prompt`); with it or
    /// --response-column the data are prompt / response pairs with the loss on the
    /// response; giving neither trains on the --text-column texts, packed into blocks of
    /// --max-len tokens.
    #[arg(long)]
    pub prompt_column: Option<String>,
    /// Causal LM: the column (JSON key) of the responses (default `response`).
    #[arg(long)]
    pub response_column: Option<String>,
    /// Causal LM: render each pair through the model's chat template (the prompt as the
    /// user's turn, the response as the assistant's, its end-of-turn token learnt too).
    #[arg(long)]
    pub chat: bool,
    /// Causal LM with --chat: a system message before each prompt.
    #[arg(long)]
    pub system: Option<String>,
}
