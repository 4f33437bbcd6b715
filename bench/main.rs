//! `cubegate-bench`: tools to test and benchmark cubegate.
//!
//! - `backend`: a deterministic simulator of vLLM's or Ollama's HTTP API and of the GPU
//!   host behind it: batch slots, prefix cache, faults (see `sim/`).
//! - `load`: a load generator with its own HTTP client (see `load/`).
//! - `compare`: the side-by-side comparison with peer proxies (see `compare/`).
//! - `fleet`: routing across simulated GPU hosts, cubegate's policies next to peer routers
//!   (see `fleet/`).
//! - `propagation`: several boxes on one PostgreSQL store, how soon a change made on one is
//!   in force on the others (see `propagation/`; the database from `services.rs`, which the
//!   tests share).
//!
//! This binary shares no code with `src/`: a parser bug in one must not hide in the other.

mod compare;
mod fleet;
mod load;
mod propagation;
mod services;
mod sim;

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "cubegate-bench",
    version,
    about = "Simulators and load tools for cubegate"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a simulated inference backend (vLLM or Ollama HTTP API) and, with --slots,
    /// --prefix-cache-tokens, --prefill-us-per-token, the GPU host behind it.
    ///
    /// Without the GPU flags every request runs at once and pays only the token delays.
    /// With them: at most --slots requests generate at once, the others wait in a FIFO
    /// queue; a prompt's leading 16-token blocks found in the prefix cache (block-hashed,
    /// LRU, as vLLM's automatic prefix caching) skip their prefill, the others cost
    /// --prefill-us-per-token each. A prompt token is a whitespace-separated word; a chat
    /// message adds 4 template tokens.
    /// vLLM's /health and /metrics (vllm:num_requests_running, vllm:num_requests_waiting,
    /// vllm:kv_cache_usage_perc, vllm:prefix_cache_queries_total,
    /// vllm:prefix_cache_hits_total) and Ollama's /api/version and /api/ps report it.
    /// Faults: --fault at start, or at run time on the --control listener:
    /// PUT /fault/{none,refuse,hang,error,die-mid-stream,slow}, GET /fault, GET /stats.
    Backend(BackendArgs),
    /// Drive load against a gateway or backend; report latency percentiles and throughput.
    Load(load::LoadArgs),
    /// Side-by-side comparison with peer proxies (nginx, HAProxy, LiteLLM) on the same
    /// simulated backend: table on stdout, results.md/.json and SVG charts in --out.
    Compare(compare::CompareArgs),
    /// Fleet routing: cubegate's policies, sglang-router, vllm-router, nginx least_conn and
    /// HAProxy leastconn in front of --hosts simulated GPU hosts, on chats sharing long
    /// system prompts, open loop at --rates; then a faults run. Table on stdout,
    /// results.md/.json and ttft_p99.svg in --out.
    Fleet(fleet::FleetArgs),
    /// Several boxes on one PostgreSQL store: --boxes cubegate processes on a throwaway
    /// database; a user's membership removed and re-added --changes times, round robin over
    /// the boxes; for each change, the write's latency and how long until every other box's
    /// data plane answers her accordingly (403 / 200). Markdown on stdout, --out for files.
    Propagation(propagation::PropagationArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FlavorArg {
    Vllm,
    Ollama,
}

#[derive(clap::Args, Debug)]
struct BackendArgs {
    /// Which server's API to simulate.
    #[arg(long, value_enum)]
    flavor: FlavorArg,
    /// Address to listen on, e.g. 127.0.0.1:8000 (port 0 picks a free port).
    #[arg(long)]
    listen: String,
    /// Comma-separated model names served [default: vllm
    /// "meta-llama/Llama-3.1-8B-Instruct", ollama "llama3.2:1b"].
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Answer length in tokens when the request sets none.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Delay between tokens, in microseconds (0 = none).
    #[arg(long, default_value_t = 0)]
    token_delay_us: u64,
    /// Delay before the first token, in milliseconds (0 = none).
    #[arg(long, default_value_t = 0)]
    first_token_delay_ms: u64,
    /// Server threads, each with its own runtime and SO_REUSEPORT listener (0 = one per CPU).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Dimension of the embeddings returned.
    #[arg(long, default_value_t = 8)]
    embed_dim: usize,
    /// Requests generating at once (the GPU's running batch); the others wait in a FIFO
    /// queue (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    slots: usize,
    /// Prefix (KV) cache size in tokens, in blocks of 16, least recently used evicted
    /// first (0 = no prefix caching).
    #[arg(long, default_value_t = 0)]
    prefix_cache_tokens: usize,
    /// Prefill time of each prompt token not found in the prefix cache, in microseconds.
    #[arg(long, default_value_t = 0)]
    prefill_us_per_token: u64,
    /// Fault mode at start (switch it at run time through --control).
    #[arg(long, value_enum, default_value_t = sim::Fault::None)]
    fault: sim::Fault,
    /// How many times slower everything is in the `slow` fault mode.
    #[arg(long, default_value_t = 10)]
    slow_factor: u32,
    /// Address of the control API, e.g. 127.0.0.1:9000: PUT /fault/MODE, GET /fault,
    /// GET /stats. Always served, whatever the fault mode.
    #[arg(long)]
    control: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Backend(a) => backend(a),
        Cmd::Load(a) => load_cmd(a),
        Cmd::Compare(a) => compare::command(&a),
        Cmd::Fleet(a) => fleet::command(&a),
        Cmd::Propagation(a) => propagation::command(&a),
    }
}

fn load_cmd(a: load::LoadArgs) -> ExitCode {
    let summary = match load::run(&a) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cubegate-bench load: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", summary.human());
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&summary).expect("summary serializes");
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("cubegate-bench load: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if summary.completed == 0 {
        eprintln!("cubegate-bench load: no request completed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn backend(a: BackendArgs) -> ExitCode {
    let flavor = match a.flavor {
        FlavorArg::Vllm => sim::Flavor::Vllm,
        FlavorArg::Ollama => sim::Flavor::Ollama,
    };
    let mut models: Vec<String> = a
        .models
        .iter()
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    if models.is_empty() {
        models.push(match flavor {
            sim::Flavor::Vllm => "meta-llama/Llama-3.1-8B-Instruct".to_string(),
            sim::Flavor::Ollama => "llama3.2:1b".to_string(),
        });
    }
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    };
    let cfg = sim::Config {
        flavor,
        listen: a.listen,
        models,
        tokens: a.tokens.min(sim::openai::MAX_ANSWER),
        token_delay: Duration::from_micros(a.token_delay_us),
        first_token_delay: Duration::from_millis(a.first_token_delay_ms),
        threads,
        embed_dim: a.embed_dim.clamp(1, 65_536),
        gpu: sim::GpuConfig {
            slots: (a.slots > 0).then_some(a.slots),
            prefix_cache_tokens: a.prefix_cache_tokens,
            prefill_per_token: Duration::from_micros(a.prefill_us_per_token),
            fault: a.fault,
            slow_factor: a.slow_factor.max(1),
            control: a.control,
        },
    };
    match sim::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cubegate-bench backend: {e}");
            ExitCode::FAILURE
        }
    }
}
