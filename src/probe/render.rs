//! The readable (text) form of a [`ProbeReport`]; the JSON form is its `Serialize`.
//!
//! Formatting only: it adds no finding and no judgement that the report does not hold.

use std::fmt::Write as _;

use super::report::{DnsRecordStatus, ProbeReport};

impl ProbeReport {
    /// A readable report.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "Probe of {} (TLS port {}, path {})",
            self.host, self.tls_port, self.path
        );
        let _ = writeln!(
            o,
            "HTTPS DNS record: {}",
            match &self.https_record {
                DnsRecordStatus::Present { records } => format!("present: {}", records.join(" | ")),
                DnsRecordStatus::Absent => "absent".into(),
                DnsRecordStatus::NotChecked { why } => format!("not checked ({why})"),
            }
        );
        for a in &self.addresses {
            let _ = writeln!(o, "\n{}  grade {:?}", a.address, a.grade);
            for p in &a.cleartext {
                match (&p.with_credential, &p.without_credential) {
                    (Some(w), Some(wo)) => {
                        let _ = writeln!(
                            o,
                            "  cleartext port {:<5} accepted: with a credential it {}; without, it {}{}",
                            p.port,
                            w.describe(),
                            wo.describe(),
                            if p.differs { "  <- DIFFERENT" } else { "" }
                        );
                    }
                    _ => {
                        let _ = writeln!(o, "  cleartext port {:<5} {}", p.port, p.connect);
                    }
                }
            }
            match &a.tls.handshake {
                Some(t) => {
                    let _ = writeln!(
                        o,
                        "  TLS port {}: {} {} ALPN {}; certificate {}, {}, {}",
                        self.tls_port,
                        t.version,
                        t.cipher,
                        t.alpn.as_deref().unwrap_or("none"),
                        t.chain_error
                            .as_ref()
                            .map_or("trusted".to_owned(), |e| format!("NOT trusted ({e})")),
                        if t.hostname_match {
                            "matches the host"
                        } else {
                            "does NOT match the host"
                        },
                        t.days_to_expiry
                            .map_or("expiry unknown".to_owned(), |d| format!(
                                "expires in {d} days"
                            ))
                    );
                }
                None => {
                    let _ = writeln!(
                        o,
                        "  TLS port {}: {}",
                        self.tls_port,
                        a.tls.error.as_deref().unwrap_or("no answer")
                    );
                }
            }
            match &a.tls.hsts {
                Some(h) => {
                    let _ = writeln!(
                        o,
                        "  HSTS: {}{}",
                        h.header,
                        if h.preload_missing.is_empty() {
                            " (meets the preload list's requirements)".to_owned()
                        } else {
                            format!(
                                " (for preloading, still needs: {})",
                                h.preload_missing.join(", ")
                            )
                        }
                    );
                }
                None => {
                    let _ = writeln!(o, "  HSTS: none");
                }
            }
            let _ = writeln!(
                o,
                "  HTTP/3: {}{}",
                match (&a.tls.http3.offered, &a.tls.http3.error) {
                    (true, _) => format!(
                        "offered (UDP port {}: a GET over HTTP/3 answered {})",
                        self.tls_port,
                        a.tls.http3.status.unwrap_or_default()
                    ),
                    (false, e) => format!("not offered ({})", e.as_deref().unwrap_or("no answer")),
                },
                a.tls
                    .alt_svc
                    .as_ref()
                    .map_or(String::new(), |v| format!("; Alt-Svc: {v}"))
            );
            if let Some(c) = &a.tls.cleartext_to_tls_port {
                let _ = writeln!(o, "  cleartext sent to the TLS port: it {}", c.describe());
            }
            for r in &a.reasons {
                let _ = writeln!(o, "  - {r}");
            }
        }
        let _ = writeln!(o, "\noverall grade: {:?}", self.grade);
        o
    }
}
