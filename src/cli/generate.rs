//! `kiln generate`: text from a model, streamed; a chat on the terminal.

use kiln::error::Result;

use super::args;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: args::ModelArgs,
    /// The prompt; with --chat it is the user's message.
    #[arg(long, short)]
    pub prompt: Option<String>,
    /// Apply the chat template (the model's own or --chat-template); without --prompt, an
    /// interactive conversation on stdin.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// `model` (the model's own), a built-in (alpaca, chatml, llama3, phi3, mistral, gemma) or a .jinja file.
    #[arg(long, default_value = "model")]
    pub chat_template: String,
    #[command(flatten)]
    pub sampling: args::SamplingArgs,
    /// Stop when this text appears (repeatable); end-of-turn and eos tokens always stop.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print the result as JSON (text, tokens, stop reason, tokens/s) instead of streaming.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub draft: args::DraftArgs,
}

pub fn exec(args: Args) -> Result<()> {
    let sampling = args.sampling.params()?;
    let loaded = args.model.load()?;
    let draft = args.draft.load(&args.model, &loaded.tokenizer)?;
    let request = kiln::infer::chat::Request {
        prompt: args.prompt,
        chat: args.chat,
        system: args.system,
        chat_template: &args.chat_template,
        sampling,
        stop: &args.stop,
        json: args.json,
        compare_plain: args.draft.compare_plain,
    };
    let draft = draft.as_ref().map(|d| (d, args.draft.draft_tokens));
    kiln::infer::chat::run(&loaded, draft, &request, &mut std::io::stdin().lock())
}
