//! The embedded demo runs, balances over all three backends and removes what it created.

use std::process::Command;

#[test]
fn demo_runs_for_its_duration_and_cleans_up() {
    lb_tests::require_root();
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--duration", "9", "--rate", "30"])
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for b in ["b1", "b2", "b3"] {
        assert!(stdout.contains(b), "backend {b} answered: {stdout}");
    }
    // The failover act: b2 stops, the director's checks take it out, it comes back.
    for event in [
        "stopped b2's web server",
        "director: b2 is down",
        "restarted b2's web server",
        "director: b2 is up",
    ] {
        assert!(stdout.contains(event), "`{event}` in:\n{stdout}");
    }
    let last_frame = stdout
        .rsplit("xdplb demo")
        .next()
        .expect("at least one frame");
    for b in ["b1", "b2", "b3"] {
        let row = last_frame
            .lines()
            .find(|l| l.starts_with(b))
            .unwrap_or_else(|| panic!("{b} row in {last_frame}"));
        assert!(
            row.trim_end().ends_with("up"),
            "{b} healthy at the end: {row}"
        );
    }
    assert!(
        stdout.contains("198.18.100.100:80/tcp"),
        "status shown at the end: {stdout}"
    );
    let netns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    let pid_prefix = stdout
        .lines()
        .find_map(|l| l.split("network namespaces ").nth(1))
        .and_then(|s| s.split("-*").next())
        .expect("demo names its namespaces")
        .to_string();
    assert!(pid_prefix.starts_with("xdemo"), "{pid_prefix}");
    assert!(
        !netns.contains(&pid_prefix),
        "namespaces left behind: {netns}"
    );
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/xdplb-{pid_prefix}")).exists(),
        "pins left behind"
    );
}
