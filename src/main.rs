//! The `cubegate` command: `serve` (the gateway: data plane and management plane, see
//! `cubegate::serve`), `check-config` (validate a file, exit 2 naming the key) and
//! `gen-cert` (a self-signed pair for trying HTTPS). Parsing arguments, setting up logging
//! and mapping failures to exit codes is all that lives here; everything else is in the
//! library, so tests and benches reach the same code.

use clap::{Parser, Subcommand};
use cubegate::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cubegate",
    version,
    about = "Authenticating, model-routing gateway in front of GPU inference hosts (Ollama, vLLM)",
    long_about = "cubegate verifies each client's bearer token, checks that it may use the domain \
and model it asks for, picks a GPU host that serves the model, and streams the answer back \
token by token.\n\nClients call /proxy/<domain_id>/v1/... (OpenAI API) or \
/proxy/<domain_id>/api/... (Ollama API)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: the data plane on proxy.listen, the management API on
    /// management.listen.
    ///
    /// Signals: SIGHUP re-reads the file and applies the domain map, the trusted issuers
    /// and the TLS certificate and key (a broken file keeps what runs). SIGTERM or SIGINT
    /// stops accepting, lets in-flight requests and streams finish for up to
    /// timeouts.drain_s, and exits 0. SIGUSR2 starts the binary now at this path with every
    /// listening socket, waits until it listens, then drains as on SIGTERM (an upgrade
    /// without refused connections).
    ///
    /// Environment: CUBEGATE_LOG (a tracing filter, default "info";
    /// "cubegate::access=off" silences access records), CUBEGATE_LOG_FORMAT (json|text;
    /// JSON by default under systemd), the variable management.admin_password_env names
    /// (first start only), LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES (systemd socket
    /// activation), NOTIFY_SOCKET/WATCHDOG_USEC (systemd notify and watchdog).
    ///
    /// Exit codes: 0 after a drain, 1 when a listener or worker cannot start, 2 for a
    /// configuration, certificate or store problem (the message names it).
    Serve {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file; exits non-zero with a message naming the key.
    ///
    /// Also reads the TLS certificates and keys (proxy.tls_cert/tls_key,
    /// management.tls_cert/tls_key) and checks that each pair belongs together, and
    /// resolves every backend address.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write a self-signed certificate and its key (cert.pem, key.pem) for development.
    ///
    /// ECDSA P-256. Names that parse as IP addresses become IP SANs, the others DNS
    /// names. The key file is created with mode 0600. Existing files are kept unless
    /// --force is given. Point proxy.tls_cert and proxy.tls_key at the two files; clients
    /// must be told to trust cert.pem (curl --cacert cert.pem).
    GenCert {
        /// Where to write cert.pem and key.pem (created if missing).
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        /// A name the certificate is valid for; repeat for more.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
        names: Vec<String>,
        /// Days of validity (1..=3650).
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Copy a box's SQLite store and signing keys into PostgreSQL, so the box can join a
    /// fleet on the shared store (management.store = "postgres") without anyone logging in
    /// again.
    ///
    /// Copies users, domains, memberships, live API keys and refresh tokens, backends and
    /// limits set through the API, usage, and the signing keys (sealed with the key in
    /// --key-encryption-key-env). Refuses a database that already holds users unless
    /// --force; with it (and on a second run) what is there is kept and only what is
    /// missing is copied, usage included, so no token is counted twice. Stop the box
    /// first: changes made meanwhile would not be copied.
    MigrateStore {
        /// The box's management.data_dir (holding cubegate.db and keys/).
        #[arg(long)]
        from: PathBuf,
        /// Where to: "postgres".
        #[arg(long, value_parser = ["postgres"])]
        to: String,
        /// The environment variable holding the PostgreSQL connection string.
        #[arg(long, default_value = "CUBEGATE_POSTGRES_URL")]
        postgres_url_env: String,
        /// The environment variable holding the 32-byte key that seals the signing keys.
        #[arg(long, default_value = "CUBEGATE_KEY_ENCRYPTION_KEY")]
        key_encryption_key_env: String,
        /// Copy into a database that already holds users (what is there is kept).
        #[arg(long)]
        force: bool,
    },
}

/// Human-readable lines on a terminal; JSON lines under systemd (journald sets
/// `JOURNAL_STREAM`) or when `CUBEGATE_LOG_FORMAT=json`. `CUBEGATE_LOG` filters
/// (`info` by default; `cubegate::access=off` silences the access records).
///
/// Records go through a bounded in-memory queue to a writer thread: a worker never waits
/// on a slow stderr (journald under load). If the queue is full, records are dropped
/// rather than stalling requests. The returned guard flushes the queue when dropped.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(64 * 1024)
        .lossy(true)
        .thread_name("cubegate-log")
        .finish(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUBEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let format = std::env::var("CUBEGATE_LOG_FORMAT").unwrap_or_default();
    let json =
        format == "json" || (format != "text" && std::env::var_os("JOURNAL_STREAM").is_some());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        builder.json().with_current_span(false).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .init();
    }
    guard
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let _log_flush = init_logging();
            let parsed = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("cubegate: {}: {e}", config.display());
                    return ExitCode::from(2);
                }
            };
            let code = cubegate::serve(parsed, config);
            ExitCode::from(code as u8)
        }
        Command::GenCert {
            out_dir,
            names,
            days,
            force,
        } => {
            let req = cubegate::GenCert {
                out_dir,
                names,
                days,
                force,
            };
            match cubegate::gen_cert(&req) {
                Ok((cert, key)) => {
                    println!("wrote {} and {}", cert.display(), key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cubegate gen-cert: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::MigrateStore {
            from,
            to: _,
            postgres_url_env,
            key_encryption_key_env,
            force,
        } => {
            match cubegate::migrate_store(&from, &postgres_url_env, &key_encryption_key_env, force)
            {
                Ok(copied) => {
                    println!("copied {} into PostgreSQL:\n{copied}", from.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cubegate migrate-store: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::CheckConfig { config } => match cubegate::check_config(&config) {
            Ok(summary) => {
                println!("{}: {summary}", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cubegate: {}: {e}", config.display());
                ExitCode::from(2)
            }
        },
    }
}
