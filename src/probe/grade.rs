//! The grade of one address, from what the checks found, with a reason for every step down.
//!
//! Pure: it reads an [`AddressReport`] and writes its grade and reasons; it never connects and
//! never changes what the checks recorded.

use super::report::{AddressReport, Answer, Grade};

/// Grades one address, worst finding wins:
/// - F: content served over cleartext, or no TLS with a valid certificate for the host;
/// - D: a cleartext port answers differently when a credential is present;
/// - C: cleartext connections accepted (redirect, 4xx, close) and no HSTS, or a certificate
///   expiring within two weeks;
/// - B: cleartext accepted with HSTS; or HSTS or the HTTPS DNS record missing;
/// - A: every cleartext port refused (or filtered), HSTS, and an HTTPS record.
pub(super) fn grade_address(r: &mut AddressReport, has_https_record: bool) {
    let mut reasons = Vec::new();
    let mut grade = Grade::A;
    let mut worse = |g: Grade, reason: String, reasons: &mut Vec<String>| {
        grade = grade.max(g);
        reasons.push(reason);
    };
    let hsts_ok = r
        .tls
        .hsts
        .as_ref()
        .is_some_and(|h| h.max_age.is_some_and(|a| a > 0));
    for p in &r.cleartext {
        let (Some(with), Some(without)) = (&p.with_credential, &p.without_credential) else {
            continue;
        };
        if matches!(with, Answer::Content { .. }) || matches!(without, Answer::Content { .. }) {
            let served = if matches!(with, Answer::Content { .. }) {
                with
            } else {
                without
            };
            worse(
                Grade::F,
                format!("port {} {} in cleartext", p.port, served.describe()),
                &mut reasons,
            );
        } else {
            // HSTS only protects browsers that already visited; without it, nothing does.
            let g = if hsts_ok { Grade::B } else { Grade::C };
            worse(g, format!("port {} accepts cleartext (so requests and their credentials cross in the clear) and {}", p.port, with.describe()), &mut reasons);
        }
        if p.differs {
            worse(
                Grade::D,
                format!("port {} answers differently when a credential is sent: it reveals whether credentials matter", p.port),
                &mut reasons,
            );
        }
    }
    match (&r.tls.handshake, &r.tls.error) {
        (None, e) => worse(
            Grade::F,
            format!("no TLS: {}", e.clone().unwrap_or_default()),
            &mut reasons,
        ),
        (Some(info), _) => {
            if let Some(e) = &info.chain_error {
                worse(
                    Grade::F,
                    format!("certificate not trusted: {e}"),
                    &mut reasons,
                );
            }
            if !info.hostname_match {
                worse(
                    Grade::F,
                    "certificate does not match the host name".into(),
                    &mut reasons,
                );
            }
            if let Some(d) = info.days_to_expiry.filter(|d| *d < 14) {
                worse(
                    Grade::C,
                    format!("certificate expires in {d} days"),
                    &mut reasons,
                );
            }
        }
    }
    if !hsts_ok {
        worse(
            Grade::B,
            "no HSTS (or max-age 0) over TLS".into(),
            &mut reasons,
        );
    }
    if !has_https_record {
        worse(
            Grade::B,
            "no HTTPS DNS record: clients do not learn to go straight to TLS".into(),
            &mut reasons,
        );
    }
    r.grade = grade;
    r.reasons = reasons;
}
