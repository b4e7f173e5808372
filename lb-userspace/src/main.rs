//! `xdplb`: the director's command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_userspace::{
    config::{AnyHost, Config, ThisHost},
    dataplane::{self, Maps},
    run, status,
};

#[derive(Parser)]
#[command(
    name = "xdplb",
    version,
    about = "L4 load balancer (LVS-style director) on XDP",
    after_help = "Examples:
  xdplb check --config /etc/xdplb/xdplb.yaml        validate (every error with field and line)
  xdplb run --config /etc/xdplb/xdplb.yaml --keep-attached
  xdplb status                                       services, backends, health, rates
  xdplb drain web 198.18.0.12                        no new flows to a backend
  xdplb reload                                       re-read the config now
  xdplb completions bash > /etc/bash_completion.d/xdplb

Sample configs per mode: examples/{dr,tun,nat,fullnat}.yaml; a systemd unit:
packaging/xdplb.service."
)]
struct Cli {
    /// Where the running director's maps, program and links are pinned.
    #[arg(long, global = true, default_value = dataplane::PIN_DIR)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the director (or adopt the one already pinned), fill its maps from the
    /// config, run health checks, reload on SIGHUP or file change; stop with SIGINT/SIGTERM.
    #[command(after_help = "Examples:
  xdplb run --config /etc/xdplb/xdplb.yaml
  xdplb run --config /etc/xdplb/xdplb.yaml --keep-attached   # a restart keeps forwarding
  RUST_LOG=debug xdplb run --config my.yaml                  # every check result")]
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// On exit, leave the pinned director forwarding instead of detaching it.
        #[arg(long)]
        keep_attached: bool,
        /// Log every packet's fate from the data plane at debug level (RUST_LOG=debug);
        /// slow, for debugging only.
        #[arg(long)]
        debug_log: bool,
    },
    /// Validate a config; print every error with its field and line.
    #[command(after_help = "Example: xdplb check --config my.yaml")]
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Do not check that the interfaces exist here (config for another host).
        #[arg(long)]
        no_host_checks: bool,
    },
    /// Services and backends with health, last check, active flows and rates (like
    /// `ipvsadm -Ln --rate`); rates come from two snapshots of the counters.
    #[command(
        after_help = "Examples:\n  xdplb status\n  xdplb status --interval 5s --json | jq '.services[].backends[] | {address, state, rates}'"
    )]
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Time between the two counter snapshots the rates come from.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
    },
    /// Every counter, including why packets were passed to the kernel or dropped, globally
    /// and per service and backend.
    #[command(
        after_help = "Examples:\n  xdplb stats\n  xdplb stats --json\n  xdplb stats --watch 2s"
    )]
    Stats {
        #[arg(long)]
        json: bool,
        /// Print again every INTERVAL with per-second rates, until Ctrl-C (or --count).
        #[arg(long, value_parser = humantime::parse_duration)]
        watch: Option<std::time::Duration>,
        /// With --watch: stop after this many reports.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// Backend side of TUN mode: unwrap IP-in-IP packets addressed to this host (no ipip
    /// device needed) until SIGINT/SIGTERM.
    #[command(after_help = "Example: xdplb decap --iface eth0 --vip 198.18.0.100")]
    Decap {
        #[arg(long)]
        iface: String,
        /// Only unwrap packets for these inner destinations (default: any).
        #[arg(long)]
        vip: Vec<std::net::IpAddr>,
        /// auto | native | skb
        #[arg(long, default_value = "auto", value_parser = parse_mode)]
        xdp_mode: lb_userspace::config::XdpMode,
    },
    /// Stop new flows to a backend of a running director; its established flows finish.
    /// Lasts until `--undo` (also across controller restarts) or until the backend leaves
    /// the config.
    #[command(
        after_help = "Example: xdplb drain web 198.18.0.12\n         xdplb drain --undo web 198.18.0.12"
    )]
    Drain {
        /// Service name (`name:` in the config).
        service: String,
        /// Backend address.
        backend: String,
        /// Give the backend new flows again.
        #[arg(long)]
        undo: bool,
    },
    /// Make the running controller re-read its config file (as SIGHUP does) and report the
    /// result; an invalid file is rejected and changes nothing.
    #[command(
        after_help = "Example: xdplb reload   (same as: kill -HUP $(cat /run/xdplb/xdplb.lock))"
    )]
    Reload,
    /// Print a shell completion script for xdplb.
    #[command(after_help = "Examples:
  xdplb completions bash > /etc/bash_completion.d/xdplb
  xdplb completions zsh > /usr/local/share/zsh/site-functions/_xdplb")]
    Completions { shell: clap_complete::Shell },
    /// Detach a director left attached (`--keep-attached`, or a killed controller) and remove its pins.
    #[command(
        after_help = "Example: xdplb detach   (drops every established connection through it)"
    )]
    Detach,
    /// Test helper: attach a pass-through XDP program until SIGINT/SIGTERM, so that `XDP_TX`
    /// frames from the peer of this veth are delivered.
    #[command(hide = true)]
    Pass {
        #[arg(long)]
        iface: String,
    },
}

fn main() -> anyhow::Result<()> {
    // Structured logs on stderr; levels from RUST_LOG (default info). Records from the `log`
    // crate (aya-log's data-plane records with --debug-log) are bridged into tracing.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check {
            config,
            no_host_checks,
        } => {
            let host: &dyn lb_userspace::config::Host =
                if no_host_checks { &AnyHost } else { &ThisHost };
            match Config::load(&config, host) {
                Ok(c) => {
                    println!("{}: ok ({} service(s))", config.display(), c.services.len());
                    Ok(())
                }
                Err(e) => {
                    eprint!("{e}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::Run {
            config,
            keep_attached,
            debug_log,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let res = rt.block_on(run::run(run::RunOptions {
                config: &config,
                pin_dir: &cli.pin_dir,
                keep_attached,
                debug_log,
            }));
            if let Err(e) = res {
                // Config errors are already a full report.
                match e.downcast_ref::<lb_userspace::config::ConfigErrors>() {
                    Some(ce) => eprint!("{ce}"),
                    None => eprintln!("error: {e:#}"),
                }
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Status { json, interval } => {
            let maps = Maps::from_pins(&cli.pin_dir)?;
            // The controller adds names, health and last checks; without it, maps only.
            let view = run::request(&cli.pin_dir, "view")
                .ok()
                .and_then(|a| a.strip_prefix("ok: ").map(str::to_string))
                .and_then(|j| serde_json::from_str::<status::View>(&j).ok());
            let st = status::status(&maps, view, interval)?;
            if json {
                println!("{}", status::status_json(&st));
            } else {
                println!("{}", status::render_status(&st));
            }
            Ok(())
        }
        Cmd::Stats { json, watch, count } => {
            let maps = Maps::from_pins(&cli.pin_dir)?;
            let Some(every) = watch else {
                print!("{}", status::render_stats(&maps, json)?);
                return Ok(());
            };
            let mut prev: Option<status::ReasonSnapshot> = None;
            let mut n = 0u64;
            loop {
                let text = status::render_stats_since(&maps, json, prev.as_ref())?;
                if !json && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    // Clear the screen and home the cursor, like watch(1).
                    print!("\x1b[2J\x1b[H");
                }
                print!("{text}");
                if !json {
                    println!();
                }
                prev = Some((maps.reason_totals()?, std::time::Instant::now()));
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    return Ok(());
                }
                std::thread::sleep(every);
            }
        }
        Cmd::Decap {
            iface,
            vip,
            xdp_mode,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if let Err(e) = rt.block_on(lb_userspace::decap::run(&iface, &vip, xdp_mode)) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Drain {
            service,
            backend,
            undo,
        } => control(
            &cli.pin_dir,
            &format!(
                "{} {service} {backend}",
                if undo { "undrain" } else { "drain" }
            ),
        ),
        Cmd::Reload => control(&cli.pin_dir, "reload"),
        Cmd::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "xdplb", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Detach => {
            if !cli.pin_dir.exists() {
                println!("nothing pinned under {}", cli.pin_dir.display());
                return Ok(());
            }
            dataplane::remove_pins(&cli.pin_dir).context("removing the pinned director")?;
            println!("detached; removed {}", cli.pin_dir.display());
            Ok(())
        }
        Cmd::Pass { iface } => {
            let mut d = dataplane::Director::load(&dataplane::LoadOptions {
                flow_table_size: lb_userspace::config::FLOW_TABLE_MIN,
                ..Default::default()
            })?;
            pass(&mut d, &iface)
        }
    }
}

/// Ask the running controller; its answer starts with `ok:` or `error:`.
fn control(pin_dir: &std::path::Path, request: &str) -> anyhow::Result<()> {
    let answer = run::request(pin_dir, request)?;
    match answer.strip_prefix("ok: ") {
        Some(msg) => {
            println!("{msg}");
            Ok(())
        }
        None => {
            eprintln!("{}", answer.strip_prefix("error: ").unwrap_or(&answer));
            std::process::exit(1);
        }
    }
}

fn parse_mode(s: &str) -> Result<lb_userspace::config::XdpMode, String> {
    match s {
        "auto" => Ok(lb_userspace::config::XdpMode::Auto),
        "native" => Ok(lb_userspace::config::XdpMode::Native),
        "skb" => Ok(lb_userspace::config::XdpMode::Skb),
        _ => Err(format!("`{s}`: use auto, native or skb")),
    }
}

fn pass(d: &mut dataplane::Director, iface: &str) -> anyhow::Result<()> {
    d.attach_program(dataplane::PASS_PROGRAM, iface)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        anyhow::Ok(())
    })
}
