//! The real Linux build: `scripts/linux-build.sh` builds Linux 6.1 (tinyconfig + serial
//! console + PVH) with the plain toolchain and with previrt's CROSS_COMPILE toolchain, boots
//! both under QEMU TCG and writes a report. The build is cached in ~/.cache/previrt/linux
//! (keyed by the toolchain's sources), so this is fast unless the toolchain changed; when the
//! cache is missing the script builds (minutes) and a failed build fails the test loudly.
//! No timing is asserted here: the build-time ratio is in the report.

mod common;

#[test]
fn linux_builds_boots_identically_and_is_fully_covered() {
    let r = common::linux_build_report();

    for b in ["plain", "previrt"] {
        assert!(r["builds"][b]["vmlinux_bytes"].as_u64().unwrap() > 1_000_000, "{b} vmlinux missing");
        assert!(r["builds"][b]["seconds"].as_f64().unwrap() > 0.0);
    }
    let boot = &r["boot"];
    assert_eq!(boot["plain"]["init_output"], "previrt-init: hello", "plain kernel: see {}", boot["plain"]["log"]);
    assert_eq!(boot["previrt"]["init_output"], boot["plain"]["init_output"], "see {}", boot["previrt"]["log"]);
    assert_eq!(boot["identical"], true);

    let sites = &r["sites"];
    assert!(sites["total"].as_u64().unwrap() > 0, "no sites in the pre-virtualized vmlinux");
    assert!(sites["by_kind"]["cli"].as_u64().unwrap_or(0) > 0 && sites["by_kind"]["hlt"].as_u64().unwrap_or(0) > 0);
    assert_eq!(sites["mismatches"].as_array().unwrap().len(), 0, "{}", sites["mismatches"]);
    assert!(sites["padding_bytes"].as_u64().unwrap() > 0);

    let cov = &r["coverage"];
    let (found, covered) = (cov["found_64bit"].as_u64().unwrap(), cov["covered"].as_u64().unwrap());
    assert!(found > 0);
    assert_eq!(covered, found, "64-bit coverage below 100%: {}", cov["not_covered"]);
    // Whatever is not covered is 16/32-bit code, with its reason.
    for u in cov["not_covered"].as_array().unwrap() {
        assert!(u["reason"].as_str().unwrap().starts_with("code"), "uncovered 64-bit instruction: {u}");
    }

    let objs = &r["objects"];
    assert!(objs["assembled"].as_u64().unwrap() > 100);
    assert_eq!(objs["rewrite_rejected"].as_array().unwrap().len(), 0, "{}", objs["rewrite_rejected"]);
    assert_eq!(objs["errors"].as_array().unwrap().len(), 0, "{}", objs["errors"]);
    assert_eq!(
        r["objtool_warnings"]["previrt"], r["objtool_warnings"]["plain"],
        "objtool complains about rewritten objects"
    );
}
