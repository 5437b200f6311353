//! Kernel-level refusal: an nftables `inet portcullis` table that resets TCP (and answers UDP
//! with ICMP port-unreachable) on the cleartext ports of every closed-pool address, with a
//! named counter per address. It covers what the absence of a listener cannot: another program
//! holding a wildcard cleartext port, and it counts who still knocks after closing.
//!
//! The ruleset is built with the `nftables` crate and applied through `nft` in JSON mode. The
//! table is replaced whole on every apply, so applying twice is harmless; `remove` deletes it.
//! It never touches a table but its own, and never runs unless the root (or the CLI) asks.

use std::borrow::Cow;
use std::net::IpAddr;

use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, SetItem};
use nftables::schema::{Chain, Counter, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};

use crate::config::Config;
use crate::config::WELL_KNOWN_CLEARTEXT_PORTS;

/// The table portcullis owns; nothing else is touched.
pub const TABLE: &str = "portcullis";
const CHAIN: &str = "refuse_cleartext";

/// Why nft failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirewallError {
    #[error("nft: {0} (is the nftables package installed, and are you root?)")]
    Nft(String),
}

/// The counter of one closed address.
pub fn counter_name(ip: &IpAddr) -> String {
    format!("refused_{}", ip.to_string().replace(['.', ':'], "_"))
}

/// The cleartext ports refused on closed addresses: the well-known ones and every open pool's.
pub fn refused_ports(config: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = WELL_KNOWN_CLEARTEXT_PORTS.to_vec();
    for p in &config.pools {
        ports.extend(&p.cleartext_ports);
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Closed-pool addresses with their pool name.
pub fn closed_addresses(config: &Config) -> Vec<(IpAddr, String)> {
    let mut out = Vec::new();
    for p in config.pools.iter().filter(|p| p.is_closed()) {
        for a in p.addresses.iter().filter(|a| !a.is_unspecified()) {
            out.push((*a, p.name.clone()));
        }
    }
    out
}

fn field(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

/// The table's ruleset: replaces any earlier portcullis table in one transaction.
pub fn ruleset(config: &Config) -> Nftables<'static> {
    let family = NfFamily::INet;
    let table = Table {
        family,
        name: Cow::Borrowed(TABLE),
        handle: None,
    };
    let mut objects: Vec<NfObject<'static>> = vec![
        // Add-then-delete empties any earlier version, whether or not one exists.
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table.clone()))),
        NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table.clone()))),
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table))),
        NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(Chain {
            family,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(CHAIN),
            _type: Some(NfChainType::Filter),
            hook: Some(NfHook::Input),
            // Before the usual filter chains, so a broader accept elsewhere cannot let it through.
            prio: Some(-10),
            policy: Some(NfChainPolicy::Accept),
            ..Default::default()
        }))),
    ];
    let ports: Vec<SetItem<'static>> = refused_ports(config)
        .into_iter()
        .map(|p| SetItem::Element(Expression::Number(u32::from(p))))
        .collect();
    for (ip, _) in closed_addresses(config) {
        let name = counter_name(&ip);
        objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Counter(
            Counter {
                family,
                table: Cow::Borrowed(TABLE),
                name: Cow::Owned(name.clone()),
                ..Default::default()
            },
        ))));
        let daddr = if ip.is_ipv4() {
            field("ip", "daddr")
        } else {
            field("ip6", "daddr")
        };
        for (proto, reject) in [
            ("tcp", Reject::new(Some(RejectType::TCPReset), None)),
            (
                "udp",
                Reject::new(Some(RejectType::ICMPX), Some(RejectCode::PortUnreach)),
            ),
        ] {
            let expr = vec![
                eq(
                    daddr.clone(),
                    Expression::String(Cow::Owned(ip.to_string())),
                ),
                eq(
                    field(proto, "dport"),
                    Expression::Named(NamedExpression::Set(ports.clone())),
                ),
                Statement::Counter(nftables::stmt::Counter::Named(Cow::Owned(name.clone()))),
                Statement::Reject(Some(reject)),
            ];
            objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
                family,
                table: Cow::Borrowed(TABLE),
                chain: Cow::Borrowed(CHAIN),
                expr: Cow::Owned(expr),
                ..Default::default()
            }))));
        }
    }
    Nftables {
        objects: Cow::Owned(objects),
    }
}

/// The ruleset as `nft -j` JSON.
pub fn print(config: &Config) -> String {
    serde_json::to_string_pretty(&ruleset(config)).unwrap_or_default()
}

/// Installs (or replaces) the table.
pub fn apply(config: &Config) -> Result<(), FirewallError> {
    nftables::helper::apply_ruleset(&ruleset(config)).map_err(|e| FirewallError::Nft(e.to_string()))
}

/// Deletes the table, if it exists.
pub fn remove() -> Result<(), FirewallError> {
    let table = Table {
        family: NfFamily::INet,
        name: Cow::Borrowed(TABLE),
        handle: None,
    };
    let rules = Nftables {
        objects: Cow::Owned(vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table.clone()))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table))),
        ]),
    };
    nftables::helper::apply_ruleset(&rules).map_err(|e| FirewallError::Nft(e.to_string()))
}

/// Refused packets per closed address so far, from the table's named counters.
pub fn counters() -> Result<Vec<(String, u64)>, FirewallError> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "counters", "table", "inet", TABLE])
        .output()
        .map_err(|e| FirewallError::Nft(e.to_string()))?;
    if !out.status.success() {
        return Err(FirewallError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| FirewallError::Nft(e.to_string()))?;
    let mut list = Vec::new();
    for obj in json["nftables"].as_array().into_iter().flatten() {
        if let Some(c) = obj.get("counter") {
            if let (Some(name), Some(packets)) = (c["name"].as_str(), c["packets"].as_u64()) {
                list.push((name.to_owned(), packets));
            }
        }
    }
    Ok(list)
}
