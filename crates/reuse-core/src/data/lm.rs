//! Causal-LM data: plain text packed into blocks of tokens, prompt/response pairs with
//! the loss on the response only, and chat templates rendered as transformers renders
//! them (`tokenizer.chat_template`, Jinja).

use tch::{Device, Tensor};
use tokenizers::Tokenizer;

use super::{Batch, BatchSource};
use crate::{Error, Result};

/// Token ids of `text` (the tokenizer's special tokens added, as transformers'
/// `tokenizer(text)` adds them).
pub fn encode(tok: &Tokenizer, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
    let enc = tok
        .encode(text, add_special_tokens)
        .map_err(|e| Error::invalid("tokenizer", format!("cannot encode text: {e}")))?;
    Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
}

/// Plain text as fixed blocks of tokens: documents concatenated with `eos` after each,
/// cut into blocks of `block` tokens (the last partial block dropped, as transformers'
/// `group_texts` drops it). Every position is a target.
#[derive(Debug)]
pub struct PackedText {
    blocks: Tensor,
}

impl PackedText {
    /// Packs already tokenized documents.
    pub fn from_ids(docs: &[Vec<i64>], eos: i64, block: usize) -> Result<Self> {
        if block < 2 {
            return Err(Error::invalid(
                "block size",
                format!("needs at least 2 tokens, found {block}"),
            ));
        }
        let mut all: Vec<i64> = Vec::with_capacity(docs.iter().map(|d| d.len() + 1).sum());
        for d in docs {
            all.extend_from_slice(d);
            all.push(eos);
        }
        let n = all.len() / block;
        if n == 0 {
            return Err(Error::invalid(
                "packed text",
                format!(
                    "{} tokens in all do not fill one block of {block}",
                    all.len()
                ),
            ));
        }
        all.truncate(n * block);
        Ok(Self {
            blocks: Tensor::from_slice(&all).view([n as i64, block as i64]),
        })
    }

    /// Tokenizes `texts` (special tokens as the tokenizer adds them) and packs them.
    pub fn new(tok: &Tokenizer, texts: &[String], eos: i64, block: usize) -> Result<Self> {
        let docs = texts
            .iter()
            .map(|t| encode(tok, t, true))
            .collect::<Result<Vec<_>>>()?;
        Self::from_ids(&docs, eos, block)
    }

    /// Tokens in all blocks.
    pub fn tokens(&self) -> i64 {
        self.blocks.numel() as i64
    }
}

impl BatchSource for PackedText {
    fn len(&self) -> usize {
        self.blocks.size()[0] as usize
    }

    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch> {
        let n = self.len() as i64;
        if let Some(bad) = indices.iter().find(|&&i| i < 0 || i >= n) {
            return Err(Error::invalid(
                "packed text",
                format!("block {bad} is out of range ({n} blocks)"),
            ));
        }
        let ids = self
            .blocks
            .index_select(0, &Tensor::from_slice(indices))
            .to_device(device);
        Ok(Batch {
            labels: ids.shallow_clone(),
            mask: Some(ids.ones_like()),
            padded: false,
            inputs: ids,
            indices: indices.to_vec(),
            task_ids: None,
        })
    }
}

/// Prompt/response examples: each row is the prompt's tokens then the response's, the
/// loss on the response tokens only (prompt positions are labelled -100, as TRL's
/// completion-only loss does). Batches are right-padded with `pad`.
#[derive(Debug)]
pub struct PromptResponse {
    rows: Vec<(Vec<i64>, usize)>,
    pad: i64,
}

impl PromptResponse {
    /// From token ids: `(ids, prompt_len)` per example; rows longer than `max_len` are
    /// cut at `max_len` (their response shortened), rows whose response is cut away
    /// entirely are an error naming the row.
    pub fn from_ids(rows: Vec<(Vec<i64>, usize)>, pad: i64, max_len: usize) -> Result<Self> {
        let mut out = Vec::with_capacity(rows.len());
        for (i, (mut ids, p)) in rows.into_iter().enumerate() {
            if p >= ids.len().min(max_len) {
                return Err(Error::invalid(
                    format!("example {i}"),
                    format!(
                        "its prompt is {p} tokens and the limit {max_len}: no response token is left to learn from (shorten the prompt or raise the limit)"
                    ),
                ));
            }
            ids.truncate(max_len);
            out.push((ids, p));
        }
        Ok(Self { rows: out, pad })
    }

    /// Tokens of each row (prompt and response).
    pub fn lengths(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.0.len()).collect()
    }
}

impl BatchSource for PromptResponse {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch> {
        let n = self.rows.len() as i64;
        if let Some(bad) = indices.iter().find(|&&i| i < 0 || i >= n) {
            return Err(Error::invalid(
                "prompt/response data",
                format!("example {bad} is out of range ({n} examples)"),
            ));
        }
        let rows: Vec<&(Vec<i64>, usize)> =
            indices.iter().map(|&i| &self.rows[i as usize]).collect();
        let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let b = rows.len();
        let (mut ids, mut mask, mut labels) = (
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
        );
        let mut padded = false;
        for (row, p) in rows {
            let pad = t - row.len();
            padded |= pad > 0;
            ids.extend(
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(self.pad, pad)),
            );
            mask.extend(std::iter::repeat_n(1i64, row.len()).chain(std::iter::repeat_n(0, pad)));
            labels.extend(
                row.iter()
                    .enumerate()
                    .map(|(j, &id)| if j < *p { -100 } else { id })
                    .chain(std::iter::repeat_n(-100, pad)),
            );
        }
        let shape = [b as i64, t as i64];
        let to = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
        Ok(Batch {
            inputs: to(&ids),
            mask: Some(to(&mask)),
            padded,
            labels: to(&labels),
            indices: indices.to_vec(),
            task_ids: None,
        })
    }
}

/// One chat message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's chat template (`tokenizer.chat_template`, Jinja), rendered as
/// transformers' `apply_chat_template` renders it: `messages`, `add_generation_prompt`,
/// `bos_token`, `eos_token` and `raise_exception` in scope, Python string methods
/// available.
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `template`; `bos` and `eos` are the tokenizer's special-token strings.
    pub fn new(template: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| Error::invalid("chat template", format!("does not compile: {e}")))?;
        Ok(Self {
            env,
            bos: bos.into(),
            eos: eos.into(),
        })
    }

    /// The conversation as text; with `add_generation_prompt`, followed by what opens
    /// the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat").expect("added in new");
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| Error::invalid("chat template", format!("cannot render: {e}")))
    }

    /// The tokens of one prompt/response exchange and the prompt's length: the prompt
    /// is `[system?, user]` rendered with the generation prompt, the whole is the same
    /// with the assistant's reply; the reply's tokens (its end-of-turn marker included)
    /// are what the loss covers. The prompt's tokens must be a prefix of the whole's (a
    /// template where they are not is an error).
    pub fn exchange(
        &self,
        tok: &Tokenizer,
        system: Option<&str>,
        prompt: &str,
        response: &str,
    ) -> Result<(Vec<i64>, usize)> {
        let mut msgs: Vec<Message> = system
            .map(|s| Message::new("system", s))
            .into_iter()
            .collect();
        msgs.push(Message::new("user", prompt));
        let head = self.render(&msgs, true)?;
        msgs.push(Message::new("assistant", response));
        let whole = self.render(&msgs, false)?;
        // The template's text carries its own special tokens (BOS if it writes one).
        let head_ids = encode(tok, &head, false)?;
        let ids = encode(tok, &whole, false)?;
        if !ids.starts_with(&head_ids) {
            return Err(Error::invalid(
                "chat template",
                "the prompt's tokens are not a prefix of the whole exchange's: cannot tell the response apart",
            ));
        }
        Ok((ids, head_ids.len()))
    }
}

/// Tokens of `prompt` then `response` then `eos`, and the prompt's length: a plain
/// (non-chat) prompt/response example, the tokenizer's special tokens added to the
/// prompt as it adds them to any text.
pub fn plain_exchange(
    tok: &Tokenizer,
    prompt: &str,
    response: &str,
    eos: i64,
) -> Result<(Vec<i64>, usize)> {
    let mut ids = encode(tok, prompt, true)?;
    let p = ids.len();
    ids.extend(encode(tok, response, false)?);
    ids.push(eos);
    Ok((ids, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_puts_eos_between_documents_and_drops_the_tail() {
        let p = PackedText::from_ids(&[vec![5, 6, 7], vec![8], vec![9, 10, 11, 12]], 2, 4).unwrap();
        assert_eq!(p.len(), 2);
        let b = p.batch(&[0, 1], Device::Cpu).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(b.inputs.view([-1])).unwrap(),
            [5, 6, 7, 2, 8, 2, 9, 10]
        );
        assert_eq!(b.num_targets(), 6);
        assert!(PackedText::from_ids(&[vec![1]], 2, 4).is_err());
        assert!(p.batch(&[2], Device::Cpu).is_err());
    }

    #[test]
    fn prompt_response_labels_only_the_response_and_pads_right() {
        let d = PromptResponse::from_ids(vec![(vec![1, 2, 3, 4, 5], 3), (vec![1, 9, 8], 2)], 0, 16)
            .unwrap();
        let b = d.batch(&[0, 1], Device::Cpu).unwrap();
        assert!(b.padded);
        assert_eq!(
            Vec::<i64>::try_from(b.labels.view([-1])).unwrap(),
            [-100, -100, -100, 4, 5, -100, -100, 8, -100, -100]
        );
        assert_eq!(
            Vec::<i64>::try_from(b.mask.as_ref().unwrap().view([-1])).unwrap(),
            [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
        );
        assert_eq!(b.num_targets(), 3);
        let e = PromptResponse::from_ids(vec![(vec![1, 2, 3], 3)], 0, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("example 0"), "{e}");
    }

    #[test]
    fn chatml_renders_as_transformers_does() {
        // SmolLM2's template (from its GGUF), and the text transformers 5.24's
        // apply_chat_template gives for it (printed once from the .venv).
        let tpl = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(tpl, "<|im_start|>", "<|im_end|>").unwrap();
        let got = t.render(&[Message::new("user", "Hi there")], true).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let got = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        let bad = ChatTemplate::new("{% if %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("chat template"), "{bad}");
        let raising = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let e = raising.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("no system role"), "{e}");
    }
}
