//! CLIP's tokenizer as SD 1.5 directories ship it, giving the ids transformers'
//! `CLIPTokenizer` gives when `StableDiffusionPipeline` calls it (`padding="max_length",
//! max_length=77, truncation=True`).
//!
//! Two layouts of `tokenizer/` exist in the wild: `vocab.json` + `merges.txt` (what the SD 1.5
//! repositories ship, and transformers' slow format) and `tokenizer.json` (what transformers 5
//! saves). A `tokenizer.json` is used as it is; from the two files we build the same pipeline
//! transformers builds: NFC, whitespace runs → one space, lower case; CLIP's split regex; byte-level
//! BPE with `</w>` word ends; `<|startoftext|>` … `<|endoftext|>` around the text. The special
//! tokens (pad above all: SD 1.5 pads with `<|endoftext|>`, SD 2 with `!`) come from
//! `special_tokens_map.json`, then `tokenizer_config.json`, as transformers reads them.
//!
//! Over-long prompts are truncated to the context (start token, 75 text tokens, end token), with
//! a warning naming the dropped text, as diffusers does.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Decoder, PostProcessor, SplitDelimiterBehavior, Tokenizer};

use crate::weights::LoadError;

/// CLIP's pre-tokenizer (openai/CLIP `simple_tokenizer.py`, as transformers writes it into
/// `tokenizer.json`): the special tokens, English contractions, letter runs, single digits, and
/// runs of anything else that is not a space.
pub const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The suffix CLIP's BPE marks the last piece of a word with.
pub const END_OF_WORD: &str = "</w>";
const START_OF_TEXT: &str = "<|startoftext|>";
const END_OF_TEXT: &str = "<|endoftext|>";

/// A prompt as token ids, padded to the context length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// Ids before padding: start token, text, end token (≤ the context).
    pub used: usize,
    /// Tokens dropped because the prompt was longer than the context (0 when it fit).
    pub truncated: usize,
}

/// The special tokens of a tokenizer directory, by content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: String,
    pub eos: String,
    pub pad: String,
    pub unk: String,
}

impl Default for SpecialTokens {
    /// transformers' `CLIPTokenizer` defaults (SD 1.5's choice: pad with the end token).
    fn default() -> Self {
        Self { bos: START_OF_TEXT.into(), eos: END_OF_TEXT.into(), pad: END_OF_TEXT.into(), unk: END_OF_TEXT.into() }
    }
}

impl SpecialTokens {
    /// Reads `special_tokens_map.json`, then `tokenizer_config.json` for what the first leaves
    /// unset (transformers lets the map win); each entry is a string or an `AddedToken` object.
    pub fn read(dir: &Path) -> Result<Self, LoadError> {
        let mut tokens = Self::default();
        let mut seen = [false; 4];
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let value: Value = crate::weights::read_json(&path)?;
            let fields = [("bos_token", &mut tokens.bos), ("eos_token", &mut tokens.eos), ("pad_token", &mut tokens.pad), ("unk_token", &mut tokens.unk)];
            for ((key, slot), seen) in fields.into_iter().zip(seen.iter_mut()) {
                let content = match value.get(key) {
                    None | Some(Value::Null) => continue,
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Object(o)) => match o.get("content") {
                        Some(Value::String(s)) => s.clone(),
                        _ => return Err(config_error(&path, format!("`{key}` has no string `content`"))),
                    },
                    Some(other) => return Err(config_error(&path, format!("`{key}` must be a string or an object with `content`, not {other}"))),
                };
                if !*seen {
                    *slot = content;
                    *seen = true;
                }
            }
        }
        Ok(tokens)
    }
}

/// `model_max_length` of `tokenizer_config.json`, when it sets a real one (transformers writes
/// a huge sentinel when there is none).
fn model_max_length(dir: &Path) -> Result<Option<usize>, LoadError> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let value: Value = crate::weights::read_json(&path)?;
    Ok(value.get("model_max_length").and_then(Value::as_u64).filter(|&n| n < 1_000_000).map(|n| n as usize))
}

/// What a tokenizer folder lacks, its names prefixed with `prefix` (`"tokenizer/"` when
/// reporting for a whole SD directory); `None` when it has a usable set of files.
pub fn missing_files(dir: &Path, prefix: &str) -> Option<String> {
    let (vocab, merges) = (dir.join("vocab.json").is_file(), dir.join("merges.txt").is_file());
    match (dir.join("tokenizer.json").is_file(), vocab, merges) {
        (true, _, _) | (false, true, true) => None,
        (false, true, false) => Some(format!("{prefix}merges.txt (next to {prefix}vocab.json)")),
        (false, false, true) => Some(format!("{prefix}vocab.json (next to {prefix}merges.txt)")),
        (false, false, false) => Some(format!("{prefix}tokenizer.json (or {prefix}vocab.json + {prefix}merges.txt)")),
    }
}

fn config_error(path: &Path, message: String) -> LoadError {
    LoadError::Config { path: path.into(), message }
}

/// Which files a tokenizer was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    TokenizerJson(PathBuf),
    VocabMerges { vocab: PathBuf, merges: PathBuf },
}

impl std::fmt::Display for TokenizerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TokenizerJson(path) => write!(f, "{}", path.display()),
            Self::VocabMerges { vocab, merges } => write!(f, "{} + {}", vocab.display(), merges.display()),
        }
    }
}

/// The CLIP tokenizer of an SD directory. `Send + Sync`.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    source: TokenizerSource,
    start_id: u32,
    end_id: u32,
    pad_id: u32,
    /// Whether the tokenizer's post-processor adds the start and end tokens itself (CLIP's
    /// does; a bare `tokenizer.json` may not, and then we add them).
    adds_specials: bool,
    context: usize,
}

impl PromptTokenizer {
    /// The tokenizer of `dir`: a pipeline directory (its `tokenizer/` is used) or a tokenizer
    /// directory. `tokenizer.json` wins when present, as in transformers. `context` is the text
    /// encoder's (its `max_position_embeddings`); `None` takes the tokenizer's
    /// `model_max_length`, else 77. A `model_max_length` that disagrees with the encoder is an
    /// error: the encoder could not take the ids, or would see a different padding.
    pub fn from_dir(dir: &Path, context: Option<usize>) -> Result<Self, LoadError> {
        let dir = if dir.join("tokenizer").is_dir() { dir.join("tokenizer") } else { dir.to_path_buf() };
        let config_length = model_max_length(&dir)?;
        let context = match (context, config_length) {
            (Some(encoder), Some(tokenizer)) if encoder != tokenizer => {
                return Err(config_error(
                    &dir.join("tokenizer_config.json"),
                    format!("model_max_length {tokenizer} disagrees with the text encoder's max_position_embeddings {encoder}"),
                ));
            }
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => 77,
        };
        if context < 2 {
            return Err(config_error(&dir, format!("a context of {context} tokens cannot hold the start and end tokens")));
        }
        let special = SpecialTokens::read(&dir)?;
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if json.is_file() {
            let tokenizer = Tokenizer::from_file(&json).map_err(|e| config_error(&json, format!("not a tokenizer.json: {e}")))?;
            Self::new(tokenizer, TokenizerSource::TokenizerJson(json), &special, context)
        } else if vocab.is_file() && merges.is_file() {
            let tokenizer = clip_tokenizer(&vocab, &merges, &special)?;
            Self::new(tokenizer, TokenizerSource::VocabMerges { vocab, merges }, &special, context)
        } else {
            let files = missing_files(&dir, "").into_iter().collect();
            Err(LoadError::MissingFiles { dir, files })
        }
    }

    fn new(tokenizer: Tokenizer, source: TokenizerSource, special: &SpecialTokens, context: usize) -> Result<Self, LoadError> {
        let id = |role: &str, token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| LoadError::Config {
                path: PathBuf::from(source.to_string()),
                message: format!("the {role} token `{token}` is not in the vocabulary"),
            })
        };
        let adds_specials = tokenizer.get_post_processor().is_some_and(|p| p.added_tokens(false) > 0);
        Ok(Self {
            adds_specials,
            start_id: id("start", &special.bos)?,
            end_id: id("end", &special.eos)?,
            pad_id: id("padding", &special.pad)?,
            tokenizer,
            source,
            context,
        })
    }

    /// Where the vocabulary came from.
    pub fn source(&self) -> &TokenizerSource {
        &self.source
    }

    /// Ids the tokenizer can give (its vocabulary and added tokens).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Ids per prompt the text encoder takes.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The vocabulary's string for `id` (as transformers' `convert_ids_to_tokens`).
    pub fn token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// Tokenizes with start/end tokens, truncates to the context (keeping the end token last)
    /// with a warning naming what was dropped, and pads with the pad token.
    pub fn tokenize(&self, prompt: &str) -> Result<Tokens, String> {
        let encoding = self.tokenizer.encode(prompt, true).map_err(|e| format!("tokenizing prompt: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        if !self.adds_specials {
            ids.insert(0, self.start_id);
            ids.push(self.end_id);
        }
        let mut truncated = 0;
        if ids.len() > self.context {
            truncated = ids.len() - self.context;
            let dropped = self.decode(&ids[self.context - 1..ids.len() - 1]);
            tracing::warn!(dropped_tokens = truncated, "prompt longer than {} tokens: truncated, dropping {dropped:?}", self.context);
            ids.truncate(self.context - 1);
            ids.push(self.end_id);
        }
        let used = ids.len();
        ids.resize(self.context, self.pad_id);
        Ok(Tokens { ids, used, truncated })
    }

    /// Text of `ids` for messages: byte-level pieces back to UTF-8, `</w>` as a space.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(piece) = self.tokenizer.id_to_token(id) else { continue };
            let (body, word_end) = match piece.strip_suffix(END_OF_WORD) {
                Some(body) => (body.to_string(), true),
                None => (piece, false),
            };
            let decoded = ByteLevelDecoder::default().decode_chain(vec![body]).unwrap_or_default();
            bytes.extend(decoded.concat().into_bytes());
            if word_end {
                bytes.push(b' ');
            }
        }
        String::from_utf8_lossy(&bytes).trim_end().to_string()
    }

    /// (B, context) u32 ids for `prompts`.
    pub fn batch(&self, prompts: &[&str], device: &Device) -> Result<Tensor, String> {
        let mut flat = Vec::with_capacity(prompts.len() * self.context);
        for p in prompts {
            flat.extend(self.tokenize(p)?.ids);
        }
        Tensor::from_vec(flat, (prompts.len(), self.context), device).map_err(|e| e.to_string())
    }
}

/// transformers' CLIP tokenizer pipeline from `vocab.json` + `merges.txt` (the same components
/// transformers 5 writes into a `tokenizer.json` for it).
fn clip_tokenizer(vocab: &Path, merges: &Path, special: &SpecialTokens) -> Result<Tokenizer, LoadError> {
    let files = format!("{} + {}", vocab.display(), merges.display());
    let bad = |message: String| LoadError::Config { path: PathBuf::from(&files), message };
    let utf8 = |p: &Path| p.to_str().map(str::to_string).ok_or_else(|| bad(format!("{}: path is not UTF-8", p.display())));
    let model = BPE::from_file(&utf8(vocab)?, &utf8(merges)?)
        .unk_token(special.unk.clone())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD.into())
        .build()
        .map_err(|e| bad(format!("not a BPE vocabulary and merge list: {e}")))?;
    let whitespace = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| bad(e.to_string()))?;
    let split = Split::new(SplitPattern::Regex(CLIP_SPLIT_REGEX.into()), SplitDelimiterBehavior::Removed, true).map_err(|e| bad(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()])))
        .with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()])));
    let id = |token: &str| tokenizer.token_to_id(token).ok_or_else(|| bad(format!("the special token `{token}` is not in the vocabulary")));
    let (bos, eos) = (id(&special.bos)?, id(&special.eos)?);
    tokenizer.with_post_processor(Some(RobertaProcessing::new((special.eos.clone(), eos), (special.bos.clone(), bos)).trim_offsets(false).add_prefix_space(false)));
    // Only tokens the vocabulary has: a new id would lie outside the text encoder's embedding
    // (a pad token missing from the vocabulary is reported by `PromptTokenizer::new`).
    let mut specials: Vec<AddedToken> = Vec::new();
    for token in [&special.bos, &special.eos, &special.unk, &special.pad] {
        if tokenizer.token_to_id(token).is_some() && !specials.iter().any(|t| &t.content == token) {
            specials.push(AddedToken::from(token.clone(), true));
        }
    }
    tokenizer.add_special_tokens(&specials);
    Ok(tokenizer)
}
