//! Exit accounting: how many exits of each kind, and how long the VMM spent handling them.
//!
//! Keys are (table, name): the exit reason, and for exits that have one, the port, MMIO
//! address, MSR or hypercall. Time is the user-space handling time of each exit (from the
//! return of KVM_RUN to the next entry); time inside KVM_RUN is kept as one total.

use std::collections::BTreeMap;
use std::time::Duration;

/// One row: exit count and handling time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub count: u64,
    pub ns: u64,
}

/// Tables of the accounting, in the order they are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    Reason,
    Port,
    Mmio,
    Msr,
    Hypercall,
    /// Instructions the VMM completed for the host emulator.
    Insn,
}

impl Table {
    const ALL: [Table; 6] = [Table::Reason, Table::Port, Table::Mmio, Table::Msr, Table::Hypercall, Table::Insn];
    fn name(self) -> &'static str {
        match self {
            Table::Reason => "reasons",
            Table::Port => "ports",
            Table::Mmio => "mmio",
            Table::Msr => "msrs",
            Table::Hypercall => "hypercalls",
            Table::Insn => "completed",
        }
    }
}

/// The whole run's accounting.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    rows: BTreeMap<(Table, String), Row>,
    /// Time spent inside KVM_RUN (guest execution plus in-kernel exit handling).
    pub in_kvm: Duration,
    /// Wall time from the first KVM_RUN to the end.
    pub wall: Duration,
    /// KVM's own counters at the end of the run ([`crate::kvmstats`]): traffic the host kernel
    /// handled without an exit to the VMM (empty when the host has no binary stats).
    pub kvm: Vec<(&'static str, u64)>,
}

impl Stats {
    /// Count one event of `name` in `table` that took `t` to handle.
    pub fn add(&mut self, table: Table, name: impl Into<String>, t: Duration) {
        let r = self.rows.entry((table, name.into())).or_default();
        r.count += 1;
        r.ns += t.as_nanos() as u64;
    }

    pub fn row(&self, table: Table, name: &str) -> Row {
        self.rows.get(&(table, name.to_string())).copied().unwrap_or_default()
    }

    /// Total exits (the reason table's counts).
    pub fn exits(&self) -> u64 {
        self.rows.iter().filter(|((t, _), _)| *t == Table::Reason).map(|(_, r)| r.count).sum()
    }

    /// Rows of one table.
    pub fn table(&self, table: Table) -> impl Iterator<Item = (&str, Row)> {
        self.rows.iter().filter(move |((t, _), _)| *t == table).map(|((_, n), r)| (n.as_str(), *r))
    }

    /// Human-readable table.
    pub fn render(&self) -> String {
        let mut s = format!(
            "previrt run: {} exits, wall {:.3} ms, in KVM_RUN {:.3} ms\n",
            self.exits(),
            self.wall.as_secs_f64() * 1e3,
            self.in_kvm.as_secs_f64() * 1e3
        );
        if !self.kvm.is_empty() {
            s += "  kvm        ";
            for (n, v) in &self.kvm {
                s += &format!(" {n}={v}");
            }
            s += "\n";
        }
        for t in Table::ALL {
            let mut rows: Vec<_> = self.table(t).collect();
            if rows.is_empty() {
                continue;
            }
            rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
            s += &format!("  {:<11} {:<28} {:>10} {:>12} {:>9}\n", t.name(), "key", "count", "total µs", "avg µs");
            for (n, r) in rows {
                let avg = r.ns as f64 / r.count as f64 / 1e3;
                s += &format!("  {:<11} {:<28} {:>10} {:>12.1} {:>9.2}\n", "", n, r.count, r.ns as f64 / 1e3, avg);
            }
        }
        s
    }

    /// JSON form: `{"exits", "wall_ns", "in_kvm_ns", "reasons": {name: {count, ns}}, ...}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        o.insert("exits".into(), self.exits().into());
        o.insert("wall_ns".into(), (self.wall.as_nanos() as u64).into());
        o.insert("in_kvm_ns".into(), (self.in_kvm.as_nanos() as u64).into());
        for t in Table::ALL {
            let m: serde_json::Map<String, serde_json::Value> = self
                .table(t)
                .map(|(n, r)| (n.to_string(), serde_json::json!({"count": r.count, "ns": r.ns})))
                .collect();
            o.insert(t.name().into(), m.into());
        }
        o.insert("kvm".into(), self.kvm.iter().map(|(n, v)| (n.to_string(), serde_json::Value::from(*v))).collect());
        o.into()
    }
}
