//! `cargo xtask setup | run | test | bench`: orchestration only (prerequisites, builds, which
//! binary runs with which arguments). Nothing the `xdplb` binary needs lives here.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "xdplb developer tasks (run as root)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install every prerequisite (idempotent; quick when all are present).
    Setup,
    /// Build and run `xdplb ARGS`; with no ARGS, the embedded demo.
    #[command(
        after_help = "Examples:\n  cargo xtask run\n  cargo xtask run -- --duration 10\n  cargo xtask run -- run --config my.yaml"
    )]
    Run {
        /// Arguments for `xdplb` (or, if they start with `--duration`, for the demo).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Every test: formatting, clippy, unit tests, packet fixtures, network-namespace tests.
    Test,
    /// Benchmarks (ns/packet through BPF_PROG_TEST_RUN, next to the XDP_TX floor).
    Bench {
        /// Fewer repetitions (a smoke run).
        #[arg(long)]
        quick: bool,
    },
}

/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev", // bpf-linker links against the LLVM of our rustc (22)
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "ethtool",
    "iproute2",
    "util-linux", // nsenter
    "systemd",    // systemd-analyze verifies packaging/xdplb.service
    // The bench's peers and report (`cargo xtask bench`; its smoke test runs in `test`):
    "nftables",          // nftables DNAT with numgen, the kernel's NAT peer
    "haproxy",           // HAProxy `mode tcp`, the proxy peer
    "wrk",               // HTTP requests/s through the VIP
    "linux-perf",        // where the director's core spends its time (cpu-clock samples)
    "fonts-dejavu-core", // the font of the report's PNG plot
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn setup() -> Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("xdplb needs Linux (XDP, bpffs, network namespaces)");
    }
    let root_user = is_root();
    let need_root = |what: &str| -> Result<()> {
        if !root_user {
            bail!("{what} needs root; run `sudo -E cargo xtask setup` once");
        }
        Ok(())
    };

    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .map(|s| !s.contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if !missing.is_empty() {
        need_root("installing Debian packages")?;
        eprintln!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let toolchains =
        output(Command::new("rustup").args(["toolchain", "list"])).context("rustup is required")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain (for the eBPF build)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // bpf-linker must be linked against LLVM 22; one built against another LLVM fails late.
    let linker = output(Command::new("sh").args(["-c", "ldd \"$(command -v bpf-linker)\""]));
    if !linker.map(|l| l.contains("llvm-22")).unwrap_or(false) {
        eprintln!("setup: building bpf-linker against LLVM 22 (about a minute)");
        run(cargo()
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))?;
    }

    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        need_root("mounting bpffs")?;
        eprintln!("setup: mounting bpffs on /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} loads XDP programs and creates network namespaces: run it as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

/// Build the controller binary; returns its path.
fn build_xdplb(release: bool) -> Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "-p", "lb-userspace", "--bin", "xdplb"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("xdplb"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Run { args } => {
            setup()?;
            require_root("cargo xtask run")?;
            let xdplb = build_xdplb(true)?;
            if args.is_empty() || args[0].starts_with("--duration") {
                run(cargo()
                    .args([
                        "run",
                        "--release",
                        "-q",
                        "-p",
                        "lb-tests",
                        "--bin",
                        "demo",
                        "--",
                    ])
                    .args(&args)
                    .env("XDPLB_BIN", &xdplb))
            } else {
                run(Command::new(&xdplb).args(&args))
            }
        }
        Cmd::Test => {
            setup()?;
            require_root("cargo xtask test")?;
            run(cargo().args(["fmt", "--all", "--", "--check"]))
                .context("formatting differs: run `cargo fmt --all`")?;
            run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            let xdplb = build_xdplb(false)?;
            run(cargo().args(["test"]).env("XDPLB_BIN", &xdplb))
        }
        Cmd::Bench { quick } => {
            setup()?;
            require_root("cargo xtask bench")?;
            // The control section starts the controller itself (config edit, failover):
            // the binary is not built by `cargo run` of the bench, which only links the
            // library (a fresh clone failed there until 2026-12-06).
            let xdplb = build_xdplb(true)?;
            let mut c = cargo();
            c.env("XDPLB_BIN", &xdplb);
            c.args([
                "run",
                "--release",
                "-q",
                "-p",
                "lb-tests",
                "--bin",
                "bench",
                "--",
            ]);
            if quick {
                c.arg("--quick");
            }
            run(&mut c)
        }
    }
}
