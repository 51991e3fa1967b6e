//! A causal LM with what it takes to use it on text: its tokenizer, chat template and
//! special tokens, loaded from a Hugging Face folder (`config.json` dispatched on
//! `model_type`, `tokenizer.json`, `tokenizer_config.json`) or from a GGUF file (config,
//! weights and tokenizer from its metadata).

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::data::lm::{encode, ChatTemplate, Message};
use crate::models::llama::{CausalLm, LlamaConfig};
use crate::models::LoadOptions;
use crate::{Checkpoint, Error, Result};

/// A causal LM ready for text.
pub struct LanguageModel {
    /// The network.
    pub model: CausalLm,
    /// Its tokenizer (adds BOS when the model wants one, as transformers' does).
    pub tokenizer: Tokenizer,
    /// Its chat template, when it has one.
    pub chat: Option<ChatTemplate>,
    /// Tokens that end a turn or a text: the config's `eos_token_id`s and, for chat
    /// models, the template's end-of-turn token (`<|im_end|>`) when the vocabulary has it.
    pub stop_tokens: Vec<i64>,
    /// Where it was loaded from.
    pub source: PathBuf,
    /// The chat template's text, when it has one.
    pub chat_template: Option<String>,
    /// The BOS and EOS tokens' strings (empty when the model has none).
    pub special: (String, String),
}

impl std::fmt::Debug for LanguageModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanguageModel")
            .field("source", &self.source)
            .field("model_type", &self.model.config.model_type)
            .field("chat", &self.chat.is_some())
            .field("stop_tokens", &self.stop_tokens)
            .finish()
    }
}

/// End-of-turn markers of common chat templates, stopped at when the vocabulary has them.
const END_OF_TURN: [&str; 3] = ["<|im_end|>", "<|eot_id|>", "<|end|>"];

/// A special-token string of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl LanguageModel {
    /// The same language model with its network passed through `f` (to wrap it, e.g. in
    /// a LoRA registry, attach or merge adapters, and unwrap it again); tokenizer, chat
    /// template and stop tokens are kept.
    pub fn map_model<E>(
        self,
        f: impl FnOnce(CausalLm) -> std::result::Result<CausalLm, E>,
    ) -> std::result::Result<Self, E> {
        let LanguageModel {
            model,
            tokenizer,
            chat,
            stop_tokens,
            source,
            chat_template,
            special,
        } = self;
        Ok(LanguageModel {
            model: f(model)?,
            tokenizer,
            chat,
            stop_tokens,
            source,
            chat_template,
            special,
        })
    }

    /// Loads a `.gguf` file or a Hugging Face folder. A folder's `config.json` must name
    /// a decoder family (`llama`, `mistral`, `qwen2`); a BERT folder is an error saying
    /// the command needs a causal LM. A GGUF's linear weights stay in their codes with
    /// [`LoadOptions::keep_codes`] (see [`CausalLm::from_gguf`]).
    pub fn load(path: &Path, opts: &LoadOptions<'_>) -> Result<Self> {
        if is_gguf(path) {
            return Self::load_gguf(path, opts);
        }
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            path: cfg_path.clone(),
            reason: format!("not JSON: {e}"),
        })?;
        let model_type = json
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let arch = crate::models::arch::for_model_type(model_type).map_err(|e| Error::Corrupt {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?;
        if arch.head.is_none() {
            return Err(Error::invalid(
                format!("{}", path.display()),
                format!("`{model_type}` is an encoder, not a causal language model: this needs a decoder (llama, mistral, qwen2) folder or a .gguf file"),
            ));
        }
        let config = LlamaConfig::load(&cfg_path)?;
        let mut ck = Checkpoint::load_folder(path, tch::Device::Cpu)?;
        let model = CausalLm::from_checkpoint_with(config, &mut ck, opts)?;
        let tok_path = path.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| Error::Corrupt {
            path: tok_path.clone(),
            reason: format!("not a tokenizers file: {e}"),
        })?;
        let tc_path = path.join("tokenizer_config.json");
        let tc: serde_json::Value = match std::fs::read_to_string(&tc_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| Error::Corrupt {
                path: tc_path.clone(),
                reason: format!("not JSON: {e}"),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        // The template: tokenizer_config.json's, or a chat_template.jinja beside it.
        let template = tc
            .get("chat_template")
            .and_then(|v| v.as_str())
            .map(String::from)
            .or_else(|| std::fs::read_to_string(path.join("chat_template.jinja")).ok());
        let bos = token_string(tc.get("bos_token")).unwrap_or_default();
        let eos = token_string(tc.get("eos_token")).unwrap_or_default();
        Self::assemble(model, tokenizer, template.as_deref(), &bos, &eos, path)
    }

    fn load_gguf(path: &Path, opts: &LoadOptions<'_>) -> Result<Self> {
        let file = crate::gguf::GgufFile::open(path)?;
        let model = CausalLm::from_gguf(&file, opts)?;
        let tokenizer = crate::gguf::tokenizer(&file)?;
        let template = crate::gguf::chat_template(&file);
        let token = |key: &str| -> String {
            file.get_u64(key)
                .ok()
                .and_then(|id| tokenizer.id_to_token(id as u32))
                .unwrap_or_default()
        };
        let (bos, eos) = (
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
        );
        Self::assemble(model, tokenizer, template.as_deref(), &bos, &eos, path)
    }

    fn assemble(
        model: CausalLm,
        tokenizer: Tokenizer,
        template: Option<&str>,
        bos: &str,
        eos: &str,
        path: &Path,
    ) -> Result<Self> {
        let chat = template
            .map(|t| ChatTemplate::new(t, bos, eos))
            .transpose()?;
        let mut stop_tokens = model.config.token_ids("eos_token_id");
        if let Some(id) = tokenizer.token_to_id(eos) {
            stop_tokens.push(id as i64);
        }
        if chat.is_some() {
            for t in END_OF_TURN {
                if let Some(id) = tokenizer.token_to_id(t) {
                    stop_tokens.push(id as i64);
                }
            }
        }
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        Ok(Self {
            model,
            tokenizer,
            chat,
            stop_tokens,
            source: path.to_path_buf(),
            chat_template: template.map(String::from),
            special: (bos.to_string(), eos.to_string()),
        })
    }

    /// The token ids of a prompt: `text` as the tokenizer encodes it, or, with `chat`,
    /// the conversation `[system?, user: text]` rendered through the chat template with
    /// the generation prompt (an error naming the model when it has no template).
    pub fn prompt_ids(&self, text: &str, chat: bool, system: Option<&str>) -> Result<Vec<i64>> {
        if !chat {
            return encode(&self.tokenizer, text, true);
        }
        let t = self.chat.as_ref().ok_or_else(|| {
            Error::invalid(
                format!("{}", self.source.display()),
                "the model has no chat template (tokenizer_config.json chat_template, or tokenizer.chat_template in a GGUF): drop --chat",
            )
        })?;
        let mut msgs: Vec<Message> = system
            .map(|s| Message::new("system", s))
            .into_iter()
            .collect();
        msgs.push(Message::new("user", text));
        let rendered = t.render(&msgs, true)?;
        // The template writes its own special tokens.
        encode(&self.tokenizer, &rendered, false)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| Error::invalid("tokenizer", format!("cannot decode: {e}")))
    }
}

impl LanguageModel {
    /// Writes a Hugging Face folder transformers loads: `config.json` (with
    /// `architectures`), `model.safetensors` (the weights in the model's dtype; a tied
    /// head not repeated), `tokenizer.json`, `tokenizer_config.json` (with the chat
    /// template and special tokens) and `generation_config.json`; whole or not at all.
    pub fn save_folder(&self, out: &Path, overwrite: bool) -> Result<()> {
        let tokenizer_json = self
            .tokenizer
            .to_string(true)
            .map_err(|e| Error::invalid("tokenizer", format!("cannot serialize: {e}")))?;
        let c = &self.model.config;
        let (bos, eos) = &self.special;
        let mut tc = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": c.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
        });
        if !bos.is_empty() {
            tc["bos_token"] = bos.clone().into();
        }
        if !eos.is_empty() {
            tc["eos_token"] = eos.clone().into();
        }
        if let Some(pad) = c
            .token_ids("pad_token_id")
            .first()
            .and_then(|&id| self.tokenizer.id_to_token(id as u32))
        {
            tc["pad_token"] = pad.into();
        }
        if let Some(t) = &self.chat_template {
            tc["chat_template"] = t.clone().into();
        }
        let mut gen = serde_json::json!({});
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = c.extra.get(key).filter(|v| !v.is_null()) {
                gen[key] = v.clone();
            }
        }
        let dtype = match self.model.kind() {
            tch::Kind::BFloat16 => "bfloat16",
            tch::Kind::Half => "float16",
            _ => "float32",
        };
        let mut config = c.clone();
        config.extra.insert("torch_dtype".into(), dtype.into());
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON");
        crate::models::folder::write_folder_whole(out, overwrite, &mut |dir: &Path| {
            let write = |name: &str, text: &str| {
                let p = dir.join(name);
                std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
            };
            let mut model_dir_config = config.clone();
            if let Some(class) = self.model.arch.hf_class {
                model_dir_config
                    .extra
                    .insert("architectures".into(), serde_json::json!([class]));
            }
            write("config.json", &pretty(&model_dir_config.to_json()))?;
            self.model
                .state_dict()
                .save(dir.join("model.safetensors"))?;
            write("tokenizer.json", &tokenizer_json)?;
            write("tokenizer_config.json", &pretty(&tc))?;
            write("generation_config.json", &pretty(&gen))
        })
    }
}

/// Whether `path` names a GGUF file (by extension, or by its magic when it is a file).
pub fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    if !path.is_file() {
        return false;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}
