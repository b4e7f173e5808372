//! The benchmark keeps working: `bench --quick` runs every path (its own counter checks
//! prove each path) and prints a well-formed table. Timings are not judged here.

use std::process::Command;

/// The body rows of the first markdown table whose header line starts with `header`.
fn table<'a>(stdout: &'a str, header: &str) -> Vec<&'a str> {
    tables(stdout, header)
        .into_iter()
        .next()
        .unwrap_or_default()
}

/// The body rows of every markdown table whose header line starts with `header`.
fn tables<'a>(stdout: &'a str, header: &str) -> Vec<Vec<&'a str>> {
    let lines: Vec<&str> = stdout.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with(header))
        .map(|(i, _)| {
            lines[i + 2..]
                .iter()
                .copied()
                .take_while(|l| l.starts_with('|'))
                .collect()
        })
        .collect()
}

/// The numbers in the given cells of each row.
fn cells(rows: &[&str], at: &[usize]) -> Vec<Vec<f64>> {
    rows.iter()
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            at.iter()
                .map(|&i| {
                    cells[i]
                        .parse::<f64>()
                        .unwrap_or_else(|_| panic!("ns in {l}"))
                })
                .collect()
        })
        .collect()
}

#[test]
fn bench_quick_runs_every_path_and_reports() {
    lb_tests::require_root();
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--quick")
        .output()
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = table(&stdout, "| path");
    assert_eq!(rows.len(), 55, "one row per path:\n{stdout}");
    // Flow hits at 1, 1k, 100k and 1M established flows for each forwarding mode and family
    // the driver can cycle (DR and TUN over IPv4 and IPv6, NAT forward and reply).
    for mode in [
        "DR flow hit",
        "DR flow hit, IPv6",
        "TUN flow hit, IPIP",
        "TUN flow hit, IPv6-in-IPv6",
        "NAT forward (flow hit)",
        "NAT reply",
    ] {
        for flows in ["1 established flow ", "1k", "100k", "1M"] {
            let name = format!("| {mode}, {flows}");
            assert!(
                rows.iter().any(|r| r.starts_with(&name)),
                "a row {name}…:\n{stdout}"
            );
        }
    }
    // All-new flows with the tables full, for each mode the driver can open flows in.
    for name in [
        "| DR new flow (table full), IPv4 TCP",
        "| TUN new flow (table full), IPIP",
        "| NAT new flow (tables full), IPv4 TCP",
        "| DR new flow (table full), IPv6 TCP",
        "| TUN new flow (table full), IPv6-in-IPv6",
        "| DR new flow (table full), 4,096-entry table",
        "| DR new flow (table full), 1M-entry table",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(name)),
            "a row {name}…:\n{stdout}"
        );
    }
    // The floors for encapsulation, and each TUN hit over them.
    for name in [
        "| floor for encapsulation behind the stripping driver (room made again, MACs swapped), IPIP",
        "| floor for encapsulation behind the stripping driver (room made again, MACs swapped), IPv6-in-IPv6",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(name)),
            "a row {name}…:\n{stdout}"
        );
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("TUN hit over the floor for encapsulation") && l.contains("×")),
        "TUN over the encapsulation floor:\n{stdout}"
    );
    // The kernel's view of the program sizes: "director N insns, J B; floor M insns, K B."
    let sizes = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Program sizes"))
        .expect("program sizes line");
    let numbers: Vec<u64> = sizes
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 4, "{sizes}");
    assert!(
        numbers.iter().all(|&n| n > 0) && numbers[0] > numbers[2],
        "director larger than the floor: {sizes}"
    );
    // The verifier's work to load the director, with room below the kernel's limit.
    let processed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Verifier: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("verifier line");
    assert!(processed > 0 && processed < 1_000_000, "{processed}");
    // The stage breakdown: the floor, each stage of a DR flow hit, the whole path; both
    // families timed (steps are not judged: noise can make one negative in a quick run).
    let stages = cells(&table(&stdout, "| stage"), &[2, 4]);
    assert_eq!(stages.len(), 7, "floor, 5 stages, whole path:\n{stdout}");
    for family in 0..2 {
        assert!(
            stages.iter().all(|r| r[family] > 0.0) && stages[0][family] < stages[6][family],
            "floor below the whole path:\n{stdout}"
        );
    }
    // The ring fast path's breakdown: the floor, its 4 stages, the whole path.
    let ring = cells(&table(&stdout, "| ring stage"), &[2]);
    assert_eq!(ring.len(), 6, "floor, 4 ring stages, whole path:\n{stdout}");
    assert!(
        ring.iter().all(|r| r[0] > 0.0) && ring[0][0] < ring[5][0],
        "floor below the whole path:\n{stdout}"
    );
    // The NAT breakdowns: a client packet (floor, 8 stages, whole) and a reply (floor, 5
    // stages, whole), behind the restoring driver.
    let nat = tables(&stdout, "| NAT stage");
    assert_eq!(
        nat.iter().map(Vec::len).collect::<Vec<_>>(),
        [10, 7],
        "NAT forward and reply breakdowns:\n{stdout}"
    );
    for rows in &nat {
        let ns = cells(rows, &[2]);
        assert!(
            ns.iter().all(|r| r[0] > 0.0) && ns[0][0] < ns[ns.len() - 1][0],
            "floor below the whole path:\n{stdout}"
        );
    }
    // The TUN (IPIP) breakdown: the floor behind the driver, 7 stages, the send, the whole.
    let tun = cells(&table(&stdout, "| TUN stage"), &[2]);
    assert_eq!(
        tun.len(),
        10,
        "floor, 7 TUN stages, send, whole path:\n{stdout}"
    );
    assert!(
        tun.iter().all(|r| r[0] > 0.0) && tun[0][0] < tun[9][0],
        "floor below the whole path:\n{stdout}"
    );
    let control = table(&stdout, "| control plane");
    assert_eq!(control.len(), 10, "control-plane rows:\n{stdout}");
    let e2e = table(&stdout, "| end to end");
    assert_eq!(
        e2e.len(),
        18,
        "end-to-end rows (ceiling, DR, TUN, NAT, nftables, DR ring fast path, and two-way ceiling, NAT, nftables × 1 and 10k flows):\n{stdout}"
    );
    for row in &e2e {
        let c: Vec<&str> = row.split('|').map(str::trim).collect();
        let mpps: f64 = c[3].parse().unwrap();
        assert!(mpps > 0.0, "frames came back through the director: {row}");
        // Medians of different runs, but no run delivers more than it was offered.
        let offered: f64 = c[7].parse().unwrap();
        assert!(
            offered > 0.0 && mpps <= offered * 1.2,
            "delivered within what the generator offered: {row}"
        );
        // The program's own time on the forwarding path (none for nftables: no program).
        if row.contains("nftables") {
            assert!(c[8].is_empty(), "{row}");
        } else {
            let ns: f64 = c[8].parse().unwrap_or(f64::NAN);
            assert!(
                ns > 0.0,
                "kernel run-time statistics for the program: {row}"
            );
        }
    }
    // The loss-bounded rate of the same rows: a number for every target, no faster than the
    // generator goes flat out. 0 is a possible outcome (nothing down to 10 kpps passed: the
    // VM lost time in every trial), not a malformed report; the search itself is checked by
    // `pps_bench`'s unit tests.
    let pdr = table(&stdout, "| forwarding rate at");
    assert_eq!(
        pdr.len(),
        e2e.len(),
        "a PDR row per target and flow count:\n{stdout}"
    );
    for (row, flat) in pdr.iter().zip(&e2e) {
        let mpps: f64 = row.split('|').nth(3).unwrap().trim().parse().unwrap();
        let offered: f64 = flat.split('|').nth(7).unwrap().trim().parse().unwrap();
        assert!(
            mpps >= 0.0 && mpps <= offered * 1.5,
            "forwarded at ≤ 0.5 % loss, within the generator's rate: {row}"
        );
    }
    // The director core's time per packet at a paced rate (measured where the director has
    // a core of its own): a positive ns figure for every target and flow count, its Mpps per
    // core the inverse, and ratios to the ceiling that are numbers.
    if lb_tests::cpus() > 1 {
        let core = table(&stdout, "| director core time per packet");
        assert_eq!(
            core.len(),
            e2e.len(),
            "a core-time row per target and flow count:\n{stdout}"
        );
        for row in &core {
            let c: Vec<&str> = row.split('|').map(str::trim).collect();
            let ns: f64 = c[3].parse().unwrap_or(f64::NAN);
            let mpps: f64 = c[5].parse().unwrap_or(f64::NAN);
            let vs_ceiling: f64 = c[6].parse().unwrap_or(f64::NAN);
            // Both figures are printed rounded (ns to a whole number, Mpps to 0.01): the
            // Mpps is 1000 over some ns within half a unit of the printed one. (A fixed
            // 0.01 tolerance failed CI on 245 ns and 4.07 Mpps, which are 1000 / 245.4.)
            let (lo, hi) = (1e3 / (ns + 0.5) - 0.005, 1e3 / (ns - 0.5) + 0.005);
            assert!(
                ns > 0.5 && (lo..=hi).contains(&mpps) && vs_ceiling > 0.0,
                "{row}"
            );
        }
    }
    // Where the director's core spends its time: the ceiling's and DR's programs each hold
    // a share of their own rows' samples (four columns: ceiling and DR at 1 and 10k flows).
    let profile = table(&stdout, "| symbol");
    let share = |name: &str| -> Vec<f64> {
        let row = profile
            .iter()
            .find(|r| r.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("{name} in the profile:\n{stdout}"));
        let c: Vec<f64> = row
            .split('|')
            .skip(2)
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        assert_eq!(c.len(), 4, "{row}");
        c
    };
    let (floor, director) = (share("BPF program xdplb_floor"), share("BPF program xdplb"));
    assert!(
        floor[0] > 0.0 && floor[1] > 0.0 && director[2] > 0.0 && director[3] > 0.0,
        "each profiled core ran its program:\n{stdout}"
    );
    assert!(
        director[0] == 0.0 && floor[2] == 0.0,
        "each column profiles its own target:\n{stdout}"
    );
    let http = table(&stdout, "| HTTP through the VIP");
    assert_eq!(http.len(), 3, "xdplb, nftables, HAProxy:\n{stdout}");
    for row in &http {
        let rps: f64 = row.split('|').nth(2).unwrap().trim().parse().unwrap();
        assert!(rps > 0.0, "wrk got answers: {row}");
    }
    let targets = table(&stdout, "| target");
    // Two more for NAT × nftables two-way (by PDR); four more by the director core's time
    // where it has a core of its own.
    assert_eq!(
        targets.len(),
        if lb_tests::cpus() > 1 { 17 } else { 13 },
        "issue 8's targets, each judged:\n{stdout}"
    );
    for row in &targets {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        if cells[1].contains("(PDR)") {
            // Ratios of loss-bounded rates, which may be 0 (see above): 0 over a rate, or
            // "n/a" over a 0.
            let ok = cells[3] == "n/a" || cells[3].parse::<f64>().is_ok_and(|m| m >= 0.0);
            assert!(ok, "{row}");
        } else {
            let measured: f64 = cells[3].parse().unwrap_or(f64::NAN);
            assert!(measured.is_finite() && measured > 0.0, "{row}");
        }
        // A target without a value is never met. Behind the AF_PACKET generator (the
        // kernel refused live frames; the report's first line says so) the loss-bounded
        // end-to-end ratios are printed, not judged.
        let judged = if cells[3] == "n/a" {
            cells[4] == "n/a"
        } else if stdout.contains("Generator: AF_PACKET") && cells[1].starts_with("end to end") {
            cells[4] == "not judged (AF_PACKET generator)"
        } else {
            cells[4] == "yes" || cells[4] == "**no**"
        };
        assert!(judged, "{row}");
    }
    // The same report on disk, with its plot: a PNG of the size the bench draws.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    assert!(
        report.contains("| end to end on veth") && report.contains("](pps.png)"),
        "report.md holds the tables and links the plot"
    );
    let png = std::fs::read(dir.join("pps.png")).expect("pps.png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert_eq!((w, h), (1200, 600), "IHDR size");
    for row in control {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let ms: f64 = cells[2]
            .trim_end_matches(" ms")
            .parse()
            .unwrap_or_else(|_| panic!("median in {row}"));
        assert!(ms >= 0.0, "{row}");
    }
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let ns: f64 = cells[2]
            .parse()
            .unwrap_or_else(|_| panic!("ns/packet in {row}"));
        assert!(ns > 0.0, "{row}");
    }
}
