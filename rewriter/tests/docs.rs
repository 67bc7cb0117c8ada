//! docs/sensitive-instructions.md is generated from the catalogue and lists every kind.

use previrt_rewriter::catalogue::{kinds, markdown, ENTRIES};
use std::path::PathBuf;

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/sensitive-instructions.md")
}

#[test]
fn sensitive_instructions_doc_is_generated_from_the_table() {
    let want = markdown();
    if std::env::var_os("PREVIRT_BLESS").is_some() {
        std::fs::write(doc_path(), &want).unwrap();
    }
    let have = std::fs::read_to_string(doc_path()).expect("docs/sensitive-instructions.md exists");
    assert!(
        have == want,
        "docs/sensitive-instructions.md is stale: regenerate with PREVIRT_BLESS=1 cargo test -p previrt-rewriter --test docs"
    );
}

#[test]
fn doc_lists_every_kind_with_its_class() {
    let have = std::fs::read_to_string(doc_path()).unwrap();
    for k in kinds() {
        let row = have
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", k.name())))
            .unwrap_or_else(|| panic!("kind {} missing from the doc", k.name()));
        assert!(!row.is_empty());
        let class_heading = format!("## Class `{}`", k.class().name());
        let at_class = have.find(&class_heading).unwrap_or_else(|| panic!("{class_heading} missing"));
        let at_row = have.find(row).unwrap();
        assert!(at_row > at_class, "{} listed before its class heading", k.name());
    }
    assert!(ENTRIES.iter().all(|e| have.contains(e.why.split('|').next().unwrap())));
}
