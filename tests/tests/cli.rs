//! The operator's interface: `xdplb check` / `xdplb run` on good and bad input.
//! Bad input is one clear error per problem, exit status 1, and nothing attached or pinned.

use std::{path::Path, process::Command};

use lb_tests::netns::{self, sh};

fn xdplb(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(netns::xdplb_binary())
        .args(args)
        .output()
        .expect("run xdplb");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("xdplb-cli-{}-{name}.yaml", std::process::id()));
    std::fs::write(&p, text).expect("write config");
    p
}

#[test]
fn shipped_examples_pass_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (code, out, err) = xdplb(&[
                "check",
                "--no-host-checks",
                "--config",
                path.to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "{}: {out}{err}", path.display());
            n += 1;
        }
    }
    assert!(n >= 2, "examples/ holds the sample configs");
}

#[test]
fn check_reports_every_error_with_field_and_line() {
    let cfg = write(
        "bad",
        "interfaces:\n  - name: no-such-if0\nservices:\n  - name: web\n    vip: 198.18.0.100\n    port: 80\n    protocol: tcp\n    mode: dr\n    backends:\n      - address: 198.18.1.11\n        weight: 99999\n  - name: web\n    vip: 198.18.0.100\n    port: 80\n    protocol: tcp\n    mode: dr\n    backends: []\n",
    );
    let (code, _, err) = xdplb(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    for expected in [
        "line 2: interfaces[0].name: interface `no-such-if0` does not exist",
        "line 11: services[0].backends[0].weight: weight 99999 is out of range",
        "line 12: services[1].name: service name `web` is already used",
        "line 13: services[1].vip: duplicate service",
        "line 17: services[1].backends: service `web` has no backends",
        "5 error(s); nothing was applied",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
    let unknown = write(
        "unknown",
        "interfaces:\n  - name: lo\n    xdp_mod: skb\nservices: []\n",
    );
    let (code, _, err) = xdplb(&["check", "--config", unknown.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("line 3: interfaces[0]: unknown field `xdp_mod`"),
        "{err}"
    );
    std::fs::remove_file(cfg).ok();
    std::fs::remove_file(unknown).ok();
}

#[test]
fn run_with_bad_input_attaches_nothing() {
    lb_tests::require_root();
    // A namespace of our own: its `lo` has no native XDP, and nothing outside is touched.
    let ns = format!("xcli{}", std::process::id());
    let guard = netns::TempNs::new(&ns);
    guard.ip(&["link", "set", "lo", "up"]);
    let pin = format!("/sys/fs/bpf/xdplb-{ns}");
    let run = |cfg: &Path| {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(netns::xdplb_binary())
            .args(["--pin-dir", &pin, "run", "--config", cfg.to_str().unwrap()])
            .output()
            .expect("run");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let base = "interfaces:\n  - name: lo\n    xdp_mode: MODE\nservices:\n  - name: web\n    vip: 198.18.0.100\n    port: 80\n    protocol: tcp\n    mode: dr\n    backends:\n      - { address: 198.18.1.11, mac: '02:00:00:00:01:0b' }\n";

    let native = write("native", &base.replace("MODE", "native"));
    let (code, err) = run(&native);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("XDP driver (native) mode is not supported on lo; set `xdp_mode: skb`"),
        "{err}"
    );
    assert!(
        !Path::new(&pin).exists(),
        "nothing pinned after a failed start"
    );
    let link = sh(&["ip", "-n", &ns, "-d", "link", "show", "lo"]);
    assert!(
        !link.contains("prog/xdp"),
        "nothing attached after a failed start:\n{link}"
    );

    let invalid = write("invalid", &base.replace("MODE", "sideways"));
    let (code, err) = run(&invalid);
    assert_eq!(code, 1);
    assert!(
        err.contains("line 3: interfaces[0].xdp_mode: unknown variant `sideways`"),
        "{err}"
    );
    assert!(!Path::new(&pin).exists());

    let decap = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(netns::xdplb_binary())
        .args(["decap", "--iface", "no-such-if0"])
        .output()
        .expect("decap");
    let err = String::from_utf8_lossy(&decap.stderr);
    assert_eq!(decap.status.code(), Some(1), "{err}");
    assert!(
        err.contains("interface no-such-if0 does not exist"),
        "{err}"
    );
    let (code, _, err) = xdplb(&["decap", "--iface", "lo", "--xdp-mode", "sideways"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("use auto, native or skb"), "{err}");

    let (code, out, err) = xdplb(&["--pin-dir", &pin, "status"]);
    assert_ne!(code, 0, "status without a director fails: {out}");
    assert!(err.contains("no director is pinned"), "{err}");
    std::fs::remove_file(native).ok();
    std::fs::remove_file(invalid).ok();
}

#[test]
fn one_armed_nat_with_a_routed_backend_is_rejected_by_check() {
    lb_tests::require_root();
    let ns = format!("xna{}", std::process::id());
    let guard = netns::TempNs::new(&ns);
    for args in [
        vec!["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        vec!["link", "set", "v0", "up"],
        vec!["link", "set", "v1", "up"],
        vec!["addr", "add", "198.18.0.3/24", "dev", "v0"],
        vec!["route", "add", "198.18.9.0/24", "via", "198.18.0.1"],
    ] {
        guard.ip(&args);
    }
    guard.sysctl(&["net.ipv4.ip_forward=1"]);
    let check = |backend: &str| {
        let cfg = write(
            &format!("onearm-{backend}"),
            &format!(
                "interfaces:\n  - name: v0\nservices:\n  - name: web\n    vip: 198.18.100.100\n    port: 80\n    protocol: tcp\n    mode: nat\n    backends:\n      - address: {backend}\n"
            ),
        );
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(netns::xdplb_binary())
            .args(["check", "--config", cfg.to_str().unwrap()])
            .output()
            .expect("check");
        std::fs::remove_file(cfg).ok();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check("198.18.9.11");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("line 10: services[0].backends[0].address: NAT on a one-armed director: backend 198.18.9.11 is reached through a gateway"),
        "{err}"
    );
    let (code, err) = check("198.18.0.11");
    assert_eq!(code, 0, "an on-link backend is fine: {err}");
}

#[test]
fn drain_and_reload_without_a_controller_say_what_to_do() {
    let pin = format!("/sys/fs/bpf/xdplb-cli-none-{}", std::process::id());
    for args in [
        vec!["--pin-dir", pin.as_str(), "drain", "web", "198.18.0.11"],
        vec![
            "--pin-dir",
            pin.as_str(),
            "drain",
            "--undo",
            "web",
            "198.18.0.11",
        ],
        vec!["--pin-dir", pin.as_str(), "reload"],
    ] {
        let (code, _, err) = xdplb(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains("no controller is running") && err.contains("xdplb run --config"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn every_command_has_help_with_examples_and_completions_exist() {
    let (code, out, _) = xdplb(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Examples:"), "{out}");
    for cmd in [
        "run",
        "check",
        "status",
        "stats",
        "decap",
        "drain",
        "reload",
        "completions",
        "detach",
    ] {
        assert!(out.contains(cmd), "`{cmd}` listed in --help:\n{out}");
        let (code, help, err) = xdplb(&[cmd, "--help"]);
        assert_eq!(code, 0, "{cmd} --help: {err}");
        assert!(
            help.contains("Example"),
            "{cmd} --help has examples:\n{help}"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, err) = xdplb(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for word in ["drain", "status", "config"] {
            assert!(script.contains(word), "{shell} completion knows `{word}`");
        }
    }
    let (code, _, err) = xdplb(&["completions", "tcsh"]);
    assert_eq!(code, 2, "unknown shell is a usage error");
    assert!(err.contains("possible values"), "{err}");
}

#[test]
fn systemd_unit_runs_the_director_kept_attached_and_verifies() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/xdplb.service"),
    )
    .expect("packaging/xdplb.service");
    for line in [
        "ExecStart=/usr/local/bin/xdplb run --config /etc/xdplb/xdplb.yaml --keep-attached",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStartPre=/usr/local/bin/xdplb check --config /etc/xdplb/xdplb.yaml",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.lines().any(|l| l == line), "`{line}` in the unit");
    }
    // systemd's own check, with the binary path pointed at the one we built (Debian ships
    // systemd-analyze; the test fails if it is missing rather than skipping).
    let dir = std::env::temp_dir().join(format!("xdplb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("xdplb.service");
    let bin = netns::xdplb_binary();
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/xdplb", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (package systemd)");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("xdplb.service:"),
        "systemd-analyze verify: {err}"
    );
}
