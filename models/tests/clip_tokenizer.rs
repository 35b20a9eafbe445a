//! CLIP's tokenizer from both hub layouts (`vocab.json` + `merges.txt`, and `tokenizer.json`):
//! the reference ids of ../shared/golden/clip_tokens.json, CLIP's rules on hand-checked cases,
//! the special tokens of the config files, and (where python transformers is importable) the
//! ids transformers gives on further prompts.

mod sd_support;

use std::path::{Path, PathBuf};

use fmboost_models::base::PromptTokenizer;

/// The fixture with `vocab.json` + `merges.txt` (SD 1.5 as the hub ships it).
fn vocab_merges_dir() -> PathBuf {
    sd_support::fixture("sd15-tiny-diffusers")
}

/// The fixture with transformers 5's `tokenizer.json`.
fn tokenizer_json_dir() -> PathBuf {
    sd_support::fixture("sd15-tiny-diffusers-fp16")
}

fn load(dir: &Path) -> PromptTokenizer {
    PromptTokenizer::from_dir(dir, Some(77)).unwrap_or_else(|e| panic!("{e}"))
}

/// The vocabulary strings of a prompt's tokens up to and including the end token.
fn pieces(tokenizer: &PromptTokenizer, prompt: &str) -> Vec<String> {
    let tokens = tokenizer.tokenize(prompt).unwrap();
    tokens.ids[..tokens.used].iter().map(|&id| tokenizer.token(id).unwrap()).collect()
}

fn golden_cases() -> Vec<(String, Vec<u32>)> {
    let path = sd_support::golden_dir().join("clip_tokens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = json["cases"].as_array().expect("cases");
    assert!(cases.len() >= 10, "{}: expected the reference prompts", path.display());
    cases
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            (c["prompt"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

#[test]
fn both_layouts_give_the_reference_ids_for_every_golden_prompt() {
    for dir in [vocab_merges_dir(), tokenizer_json_dir()] {
        let tokenizer = load(&dir);
        for (prompt, expected) in golden_cases() {
            let tokens = tokenizer.tokenize(&prompt).unwrap();
            assert_eq!(tokens.ids, expected, "{}: prompt {prompt:?}", tokenizer.source());
        }
    }
    assert!(load(&vocab_merges_dir()).source().to_string().contains("merges.txt"));
    assert!(load(&tokenizer_json_dir()).source().to_string().contains("tokenizer.json"));
}

/// CLIP's rules, checked by hand against openai/CLIP's `simple_tokenizer.py` regex and the
/// byte-level BPE: the expected pieces are the vocabulary's own strings.
#[test]
fn clip_rules_on_hand_checked_cases() {
    let t = load(&vocab_merges_dir());
    let p = |prompt: &str| pieces(&t, prompt);
    // Start/end tokens, `</w>` closing every word.
    assert_eq!(p("a photo of a cat"), ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>"]);
    // Lower case; runs of whitespace (tabs, newlines) are one space; ends are trimmed.
    assert_eq!(p("  Hello\t\tWORLD\n "), ["<|startoftext|>", "hello</w>", "world</w>", "<|endoftext|>"]);
    assert_eq!(t.tokenize("A   PHOTO of\ta\n\ncat").unwrap(), t.tokenize("a photo of a cat").unwrap());
    // Accents are kept (no stripping), and composed / decomposed forms are one (NFC):
    // é is two UTF-8 bytes, "Ã©" in the byte-level alphabet.
    assert_eq!(p("café"), ["<|startoftext|>", "cafÃ©</w>", "<|endoftext|>"]);
    assert_eq!(t.tokenize("cafe\u{301}").unwrap(), t.tokenize("café").unwrap());
    assert_ne!(t.tokenize("cafe").unwrap(), t.tokenize("café").unwrap());
    // Contractions split off as CLIP's regex lists them.
    assert_eq!(
        p("it's don't I'M we'll"),
        ["<|startoftext|>", "it</w>", "'s</w>", "don</w>", "'t</w>", "i</w>", "'m</w>", "we</w>", "'ll</w>", "<|endoftext|>"]
    );
    // Runs of punctuation stay together; a letter run ends a word before them.
    assert_eq!(p("cat!!! ... ?!"), ["<|startoftext|>", "cat</w>", "!!!</w>", "...</w>", "?!</w>", "<|endoftext|>"]);
    // Every digit is a word of its own.
    assert_eq!(p("3.14"), ["<|startoftext|>", "3</w>", ".</w>", "1</w>", "4</w>", "<|endoftext|>"]);
    // No HTML unescaping (transformers' CLIPTokenizer does none either).
    assert_eq!(p("&amp;"), ["<|startoftext|>", "&</w>", "amp</w>", ";</w>", "<|endoftext|>"]);
    // The special tokens are recognised inside the text.
    assert_eq!(p("<|startoftext|>x"), ["<|startoftext|>", "<|startoftext|>", "x</w>", "<|endoftext|>"]);
    // Padding with the end token (SD 1.5's pad) up to the context.
    let tokens = t.tokenize("a cat").unwrap();
    assert_eq!((tokens.used, tokens.truncated, tokens.ids.len()), (4, 0, 77));
    assert!(tokens.ids[4..].iter().all(|&id| id == 49407));
    assert_eq!(t.decode(&tokens.ids[1..3]), "a cat");
    let accents = t.tokenize("café naïve").unwrap();
    assert_eq!(t.decode(&accents.ids[1..accents.used - 1]), "café naïve");
}

#[test]
fn over_long_prompts_keep_the_first_75_tokens_and_the_end_token() {
    let t = load(&vocab_merges_dir());
    let words: Vec<String> = (0..100).map(|i| ["red", "green", "blue"][i % 3].to_string()).collect();
    let long = t.tokenize(&words.join(" ")).unwrap();
    assert_eq!((long.ids.len(), long.used, long.truncated), (77, 77, 25));
    assert_eq!(long.ids[0], 49406);
    assert_eq!(long.ids[76], 49407, "the end token closes a truncated prompt");
    let first75 = t.tokenize(&words[..75].join(" ")).unwrap();
    assert_eq!((first75.used, first75.truncated), (77, 0), "75 words fit exactly");
    assert_eq!(long.ids, first75.ids);
    let fits = t.tokenize(&words[..74].join(" ")).unwrap();
    assert_eq!((fits.used, fits.truncated, fits.ids[75], fits.ids[76]), (76, 0, 49407, 49407));
}

/// A copy of the vocab + merges fixture's tokenizer with `files` written over it.
fn tokenizer_copy(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = vocab_merges_dir().join("tokenizer");
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[test]
fn the_pad_token_comes_from_the_config_files() {
    // SD 2's tokenizer pads with "!" (id 0): special_tokens_map.json wins over
    // tokenizer_config.json, as in transformers.
    let sd2 = tokenizer_copy(&[("special_tokens_map.json", r#"{"pad_token": "!", "eos_token": {"content": "<|endoftext|>"}}"#)]);
    let t = load(sd2.path());
    let tokens = t.tokenize("a cat").unwrap();
    assert_eq!(&tokens.ids[..5], &[49406, 320, 2368, 49407, 0]);
    assert!(tokens.ids[4..].iter().all(|&id| id == 0));
    // Only tokenizer_config.json: its pad token.
    let config_only = tokenizer_copy(&[("special_tokens_map.json", "{}"), ("tokenizer_config.json", r#"{"pad_token": {"content": "!"}, "model_max_length": 77}"#)]);
    assert_eq!(load(config_only.path()).tokenize("a").unwrap().ids[3], 0);
    // Neither: CLIP's default, the end token.
    let none = tempfile::tempdir().unwrap();
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(vocab_merges_dir().join("tokenizer").join(name), none.path().join(name)).unwrap();
    }
    assert_eq!(load(none.path()).tokenize("a").unwrap().ids[3], 49407);
}

#[test]
fn broken_tokenizer_folders_are_errors_naming_the_file() {
    let err = |dir: &Path, context: Option<usize>| match PromptTokenizer::from_dir(dir, context) {
        Ok(_) => panic!("{} (context {context:?}) loaded; expected an error", dir.display()),
        Err(e) => e.to_string(),
    };
    let unknown_pad = tokenizer_copy(&[("special_tokens_map.json", r#"{"pad_token": "<pad>"}"#)]);
    let e = err(unknown_pad.path(), Some(77));
    assert!(e.contains("padding token `<pad>` is not in the vocabulary") && e.contains("vocab.json"), "{e}");
    let bad_json = tokenizer_copy(&[("tokenizer_config.json", "{not json")]);
    let e = err(bad_json.path(), Some(77));
    assert!(e.contains("tokenizer_config.json"), "{e}");
    let bad_type = tokenizer_copy(&[("special_tokens_map.json", r#"{"pad_token": 7}"#)]);
    let e = err(bad_type.path(), Some(77));
    assert!(e.contains("special_tokens_map.json") && e.contains("pad_token"), "{e}");
    let e = err(tokenizer_copy(&[]).path(), Some(64));
    assert!(e.contains("model_max_length 77 disagrees with the text encoder's max_position_embeddings 64"), "{e}");
    let no_merges = tokenizer_copy(&[]);
    std::fs::remove_file(no_merges.path().join("merges.txt")).unwrap();
    let e = err(no_merges.path(), None);
    assert!(e.contains("merges.txt"), "{e}");
    let bad_merges = tokenizer_copy(&[("merges.txt", "#version: 0.2\nthis line has three\n")]);
    let e = err(bad_merges.path(), None);
    assert!(e.contains("merges.txt"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = err(empty.path(), None);
    assert!(e.contains("tokenizer.json (or vocab.json + merges.txt)"), "{e}");
}

/// Further prompts against transformers' `CLIPTokenizer` itself, where python has it
/// (`$FMBOOST_PYTHON`, else `python3`). Skips with the reason when it is not importable: the
/// golden and hand-checked tests above are the checks that always run.
#[test]
fn equals_transformers_on_more_prompts_where_transformers_is_installed() {
    let python = std::env::var("FMBOOST_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python).args(["-c", "import transformers"]).output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            eprintln!("SKIPPED: `{python} -c 'import transformers'` failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run `{python}` ({e}); set FMBOOST_PYTHON to a python with transformers");
            return;
        }
    }
    let prompts = [
        "Ünïcödé ÀÉÎÕÜ çà et là, naïve café",
        "they'd you've WE'RE o'clock rock'n'roll",
        "emoji 🐱👍🏽 and ★ stars ☆",
        "ﬁne ﬀ ligatures, İstanbul ß straße",
        "tabs\tand\nnewlines\r\nand\u{a0}nbsp\u{2003}em-space",
        "1e10 0.5x ½ ⅓ ² 100%",
        "(masterpiece:1.3), [[ugly]], {blue|red} <lora:foo:0.8>",
        "a photo of <|endoftext|> a <|startoftext|> cat",
        "Привет мир, γειά σου κόσμε, مرحبا بالعالم, שלום עולם",
        "中文提示词：一只可爱的猫，高清，8K",
        "hyphen-ated — em–dash … ellipsis “quotes” ‘single’",
        "UPPER lower MiXeD CamelCaseWords snake_case_words",
        "    leading and trailing spaces    ",
        "",
        &"a long prompt with many words that goes on and on ".repeat(12),
    ];
    let script = r#"
import json, sys
from transformers import CLIPTokenizer
tok = CLIPTokenizer.from_pretrained(sys.argv[1])
prompts = json.load(sys.stdin)
print(json.dumps([tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in prompts]))
"#;
    for dir in [vocab_merges_dir(), tokenizer_json_dir()] {
        let tokenizer_dir = dir.join("tokenizer");
        let mut child = std::process::Command::new(&python)
            .args(["-c", script, tokenizer_dir.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(serde_json::to_string(&prompts).unwrap().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "transformers failed: {}", String::from_utf8_lossy(&out.stderr));
        let expected: Vec<Vec<u32>> = serde_json::from_slice(&out.stdout).unwrap();
        let ours = load(&dir);
        for (prompt, expected) in prompts.iter().zip(expected) {
            assert_eq!(ours.tokenize(prompt).unwrap().ids, expected, "{}: prompt {prompt:?}", ours.source());
        }
    }
}
