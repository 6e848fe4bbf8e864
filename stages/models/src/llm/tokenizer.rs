//! The tokenizer (`tokenizer.json`, with its own special tokens and post-processor, so a
//! BOS-adding tokenizer adds BOS) and the chat template (`tokenizer_config.json`'s
//! `chat_template`, else a processor's `chat_template.jinja` or `chat_template.json`, rendered
//! with minijinja and Python-compatible string methods).
//!
//! The end-of-turn token is found, not configured: the template renders a one-turn conversation
//! and the special token that follows the assistant's text is the end of a turn (`<|im_end|>` for
//! ChatML, `<|eot_id|>` for LLaMA-3, ...).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ModelError;

pub struct TextTokenizer {
    path: PathBuf,
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    special: Value,
    end_of_turn: Option<String>,
}

const MARK: &str = "LADLE-ASSISTANT-MARK-7f3a";

/// The chat template a processor saves beside the tokenizer when `tokenizer_config.json` has
/// none: `chat_template.jinja`, or `chat_template.json`'s `chat_template` (what transformers'
/// processors write for VLMs).
fn processor_chat_template(dir: &Path) -> Result<Option<String>, ModelError> {
    let jinja = dir.join("chat_template.jinja");
    if let Ok(text) = std::fs::read_to_string(&jinja) {
        return Ok(Some(text));
    }
    let path = dir.join("chat_template.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Tokenizer { path: path.clone(), message: format!("invalid JSON: {e}") })?;
    match &v["chat_template"] {
        Value::String(t) => Ok(Some(t.clone())),
        _ => Err(ModelError::Tokenizer { path, message: "it holds no `chat_template` string".into() }),
    }
}

impl TextTokenizer {
    pub fn load(dir: &Path) -> Result<TextTokenizer, ModelError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: format!("cannot load the tokenizer: {e}"),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer {
                path: config_path.clone(),
                message: format!("invalid JSON: {e}"),
            })?,
            Err(_) => Value::Null,
        };
        let token_text =
            |v: &Value| v.as_str().map(str::to_string).or_else(|| v["content"].as_str().map(str::to_string));
        let special = serde_json::json!({
            "bos_token": token_text(&config["bos_token"]).unwrap_or_default(),
            "eos_token": token_text(&config["eos_token"]).unwrap_or_default(),
        });
        let chat_template = match config["chat_template"].as_str() {
            Some(t) => Some(t.to_string()),
            None => processor_chat_template(dir)?,
        };
        let mut t = TextTokenizer { path, tokenizer, chat_template, special, end_of_turn: None };
        if t.chat_template.is_some() {
            t.end_of_turn = t.find_end_of_turn()?;
        }
        Ok(t)
    }

    /// The number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token ids of `text`; with `special`, the tokenizer's post-processor adds its tokens (BOS).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| ModelError::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer { path: self.path.clone(), message: e.to_string() })
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The end-of-turn token's text, when the model has a chat template.
    pub fn end_of_turn(&self) -> Option<&str> {
        self.end_of_turn.as_deref()
    }

    /// The chat template rendered over `messages` (as transformers' `apply_chat_template` takes
    /// them: a list of `{role, content}`, content a string or a list of typed parts).
    pub fn render(&self, messages: Value, add_generation_prompt: bool) -> Result<String, ModelError> {
        let config_path = self.path.with_file_name("tokenizer_config.json");
        let template = self.chat_template.as_deref().ok_or_else(|| ModelError::Tokenizer {
            path: config_path.clone(),
            message:
                "the model has no chat template (`chat_template` in tokenizer_config.json), so `prompt` cannot be used"
                    .into(),
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        let err = |e: minijinja::Error| ModelError::Tokenizer {
            path: config_path.clone(),
            message: format!("the chat template failed: {e}"),
        };
        env.add_template("chat", template).map_err(err)?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(&messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.special["bos_token"].as_str().unwrap_or_default(),
            eos_token => self.special["eos_token"].as_str().unwrap_or_default(),
        };
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(err)
    }

    /// The tokens a perplexity scores: with a `prompt`, [`TextTokenizer::answer_sequence`];
    /// without, `text` with the tokenizer's special tokens, every token after the first scored.
    pub fn scored_sequence(&self, prompt: Option<&str>, text: &str) -> Result<super::Sequence, ModelError> {
        match prompt {
            Some(prompt) => self.answer_sequence(prompt, text),
            None => Ok(super::Sequence { ids: self.encode(text, true)?, score_from: 1 }),
        }
    }

    /// `text` as the answer to `prompt` in a chat: the chat prefix (not scored), then the tokens of
    /// `text` and the end-of-turn token (scored).
    pub fn answer_sequence(&self, prompt: &str, text: &str) -> Result<super::Sequence, ModelError> {
        let eot = self.end_of_turn().ok_or_else(|| ModelError::Tokenizer {
            path: self.path.with_file_name("tokenizer_config.json"),
            message: "the chat template names no end-of-turn token, so an answer has no end".into(),
        })?;
        let mut ids = self.encode(&self.chat_prefix(prompt)?, false)?;
        let score_from = ids.len();
        ids.extend(self.encode(&format!("{text}{eot}"), false)?);
        Ok(super::Sequence { ids, score_from })
    }

    /// The text before an assistant's answer to `prompt`: the user turn and the generation prompt.
    pub fn chat_prefix(&self, prompt: &str) -> Result<String, ModelError> {
        self.render(serde_json::json!([{"role": "user", "content": prompt}]), true)
    }

    fn find_end_of_turn(&self) -> Result<Option<String>, ModelError> {
        let text = self.render(
            serde_json::json!([{"role": "user", "content": "u"}, {"role": "assistant", "content": MARK}]),
            false,
        )?;
        let Some(at) = text.find(MARK) else { return Ok(None) };
        let after = &text[at + MARK.len()..];
        let specials = self.tokenizer.get_added_tokens_decoder();
        let best = specials
            .values()
            .filter(|t| t.special && !t.content.is_empty() && after.starts_with(&t.content))
            .max_by_key(|t| t.content.len());
        Ok(best
            .map(|t| t.content.clone())
            .or_else(|| self.special["eos_token"].as_str().filter(|s| !s.is_empty()).map(str::to_string)))
    }
}
