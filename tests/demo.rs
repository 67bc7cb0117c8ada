//! `previrt demo --json`: builds the example kernel both ways, runs both on the in-tree
//! hypervisor and reports the comparison. Checks the report's structure, the PASS lines of both
//! runs, identical verdicts and the exit-count targets on a short workload list.

use serde_json::Value;
use std::process::Command;

#[test]
fn demo_json_reports_identical_verdicts_and_fewer_exits() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("/dev/kvm is not accessible ({e}): previrt demo needs KVM; see scripts/install-deps.sh");
    }
    let work = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let o = Command::new(env!("CARGO_BIN_EXE_previrt"))
        .args(["demo", "--json", "--append", "workloads=timer,cpuid_msr,console hz=100", "--work"])
        .arg(&work)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "previrt demo: {err}");
    let c: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)));

    for side in ["unmodified", "previrt"] {
        let lines: Vec<&str> = c["results"][side].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let names: Vec<&str> =
            lines.iter().filter_map(|l| l.strip_prefix("WORKLOAD ")).map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(names, ["timer", "cpuid_msr", "console"], "{side}: {lines:?}");
        assert!(
            lines.iter().filter(|l| l.starts_with("WORKLOAD ")).all(|l| l.contains(" PASS checksum=")),
            "{side}: {lines:?}"
        );
        assert_eq!(lines.last(), Some(&"RESULT PASS"), "{side}");
        assert_eq!(c["status"][side], 1, "isa-debug-exit 0 → status 1 ({side})");
    }
    assert_eq!(c["identical_output"], true);
    assert_eq!(c["results"]["unmodified"], c["results"]["previrt"]);
    assert!(
        c["boot"].as_array().unwrap().iter().any(|l| l.as_str().unwrap().starts_with("previrt: backend=hv sites=")),
        "{}",
        c["boot"]
    );

    let n = |v: &Value| v.as_u64().unwrap();
    let exits = &c["exits"];
    assert!(n(&exits["unmodified"]) >= 20 * n(&exits["previrt"]), "exits {exits}");
    let console = &c["categories"]["console"];
    assert!(n(&console["unmodified"]) >= 50 * n(&console["previrt"]).max(1), "console {console}");
    assert_eq!(n(&c["categories"]["interrupt-flag"]["previrt"]), 0);
    for w in c["workloads"].as_array().unwrap() {
        assert!(w["unmodified_tsc"].as_u64().is_some() && w["previrt_tsc"].as_u64().is_some(), "{w}");
    }
    assert!(c["wall_ms"]["unmodified"].as_f64().unwrap() > 0.0 && c["wall_ms"]["previrt"].as_f64().unwrap() > 0.0);
    assert!(c["reasons"].as_object().unwrap().contains_key("io_out"), "{}", c["reasons"]);
}
