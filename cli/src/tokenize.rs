//! `fmboost tokenize`: the token ids an SD directory's text encoder sees for each prompt, to
//! compare with transformers' `CLIPTokenizer` (or to see why a prompt was truncated).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use fmboost_models::base::{ClipConfig, PromptTokenizer};

#[derive(clap::Args, Debug)]
#[command(after_help = "Output: with --json, one line per prompt holding a JSON array of all the ids the text encoder \
sees (start token, text, end token, then padding up to the context, 77 for SD 1.5), in the order the prompts were \
given: the same as transformers' CLIPTokenizer(prompt, padding=\"max_length\", max_length=77, truncation=True).input_ids. \
Without --json, a readable listing per prompt: a header with the counts, then one `id<TAB>token` line per token up to \
the end token (padding is counted, not listed). Truncation is reported on stderr either way.")]
pub struct Args {
    /// A diffusers SD directory (its `tokenizer/` is used) or a tokenizer directory
    /// (`tokenizer.json`, or `vocab.json` + `merges.txt`).
    #[arg(long)]
    model: PathBuf,
    /// One JSON array of ids per line (see below).
    #[arg(long)]
    json: bool,
    /// Prompts to tokenize, each one argument ("" is the empty prompt).
    #[arg(required = true, value_name = "PROMPT")]
    prompts: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !args.model.is_dir() {
        anyhow::bail!("--model {}: not a directory", args.model.display());
    }
    let context = encoder_context(&args.model)?;
    let tokenizer = PromptTokenizer::from_dir(&args.model, context).map_err(|e| anyhow::anyhow!("--model {}: {e}", args.model.display()))?;
    let mut out = std::io::stdout().lock();
    for (index, prompt) in args.prompts.iter().enumerate() {
        let tokens = tokenizer.tokenize(prompt).map_err(|e| anyhow::anyhow!("prompt {}: {e}", index + 1))?;
        if tokens.truncated > 0 {
            eprintln!("prompt {}: longer than {} tokens, {} dropped", index + 1, tokenizer.context(), tokens.truncated);
        }
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&tokens.ids)?)?;
            continue;
        }
        writeln!(
            out,
            "prompt {}: {prompt:?}: {} tokens, {} padding, {} truncated",
            index + 1,
            tokens.used,
            tokens.ids.len() - tokens.used,
            tokens.truncated
        )?;
        for &id in &tokens.ids[..tokens.used] {
            writeln!(out, "{id}\t{}", tokenizer.token(id).unwrap_or_default())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The text encoder's context (`text_encoder/config.json`) when `dir` is a whole SD directory.
fn encoder_context(dir: &Path) -> anyhow::Result<Option<usize>> {
    let path = dir.join("text_encoder/config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let config: ClipConfig = fmboost_models::weights::read_json(&path).map_err(|e| anyhow::anyhow!("--model: {e}"))?;
    Ok(Some(config.max_position_embeddings))
}
